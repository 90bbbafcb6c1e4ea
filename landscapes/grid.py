"""Grid axes with explicit coordinates (``ij`` order) and tiles aligned with store chunks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from landscapes.errors import ConfigurationError

__all__ = ["Grid", "Tile", "axis", "tile_shape_for"]


def axis(start: float, stop: float, num: int) -> np.ndarray:
    """Evenly spaced float64 coordinates from ``start`` to ``stop`` inclusive.

    When the range contains 0, the coordinate nearest to it is set to exactly 0, so the
    centre point of a symmetric axis is θ0 itself.

    Args:
        start: first coordinate.
        stop: last coordinate.
        num: number of points (at least 1).

    Returns:
        Array of shape ``(num,)``.

    Raises:
        ConfigurationError: ``num < 1`` or a non-finite bound.

    >>> axis(-1, 1, 5).tolist()
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ConfigurationError(
            f"axis num={num!r}: an axis needs at least one point; pass a positive integer."
        )
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ConfigurationError(
            f"axis range ({start}, {stop}) is not finite; give finite start and stop values."
        )
    if start == stop and num > 1:
        raise ConfigurationError(
            f"axis range ({start}, {stop}) has zero length but num={num}; give start != stop, or num=1."
        )
    coords = np.linspace(float(start), float(stop), int(num), dtype=np.float64)
    if num > 1 and min(start, stop) <= 0.0 <= max(start, stop):
        nearest = int(np.argmin(np.abs(coords)))
        step = abs(stop - start) / (num - 1)
        if abs(coords[nearest]) <= 1e-9 * step:
            coords[nearest] = 0.0
    return coords


@dataclass(frozen=True)
class Tile:
    """A rectangular block of grid indices: ``index`` is its position in the tile grid."""

    index: tuple[int, ...]
    slices: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Grid:
    """Coordinates along k axes; ``values[i, j]`` sits at ``(axes[0][i], axes[1][j])``."""

    axes: tuple[np.ndarray, ...]

    def __init__(self, axes: Sequence[np.ndarray | Sequence[float]]):
        checked = []
        for n, a in enumerate(axes):
            arr = np.asarray(a, dtype=np.float64)
            if arr.ndim != 1 or arr.size == 0:
                raise ConfigurationError(
                    f"axes[{n}] has shape {arr.shape}: each axis must be a non-empty 1-D array "
                    "of coordinates."
                )
            if not np.all(np.isfinite(arr)):
                raise ConfigurationError(
                    f"axes[{n}] holds non-finite coordinates; give finite values."
                )
            checked.append(arr)
        if not checked:
            raise ConfigurationError("axes is empty: give one coordinate array per direction.")
        object.__setattr__(self, "axes", tuple(checked))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def coordinates(self, slices: Sequence[slice] | None = None) -> np.ndarray:
        """Coordinates of a block (all points by default), shape ``(m, k)`` in C (``ij``) order."""
        slices = tuple(slices) if slices is not None else tuple(slice(0, n) for n in self.shape)
        parts = [a[s] for a, s in zip(self.axes, slices, strict=True)]
        mesh = np.meshgrid(*parts, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def tile_grid_shape(self, tile_shape: Sequence[int]) -> tuple[int, ...]:
        """Number of tiles along each axis."""
        tile_shape = self._check_tile_shape(tile_shape)
        return tuple(math.ceil(n / t) for n, t in zip(self.shape, tile_shape, strict=True))

    def tiles(self, tile_shape: Sequence[int]) -> list[Tile]:
        """All tiles in C order; edge tiles are smaller. Tiles align with chunks of this shape."""
        tile_shape = self._check_tile_shape(tile_shape)
        counts = self.tile_grid_shape(tile_shape)
        tiles = []
        for index in itertools.product(*(range(c) for c in counts)):
            slices = tuple(
                slice(i * t, min((i + 1) * t, n))
                for i, t, n in zip(index, tile_shape, self.shape, strict=True)
            )
            tiles.append(Tile(index=index, slices=slices))
        return tiles

    def _check_tile_shape(self, tile_shape: Sequence[int]) -> tuple[int, ...]:
        tile_shape = tuple(int(t) for t in tile_shape)
        if len(tile_shape) != self.ndim or any(t < 1 for t in tile_shape):
            raise ConfigurationError(
                f"tile_shape={tile_shape} does not fit a grid of shape {self.shape}; give one "
                "positive size per axis."
            )
        return tile_shape


def tile_shape_for(shape: Sequence[int], points: int) -> tuple[int, ...]:
    """A tile shape of about ``points`` grid points: whole rows (last axis) when they fit.

    >>> tile_shape_for((41, 41), 100)
    (2, 41)
    """
    shape = tuple(int(n) for n in shape)
    points = max(1, int(points))
    last = shape[-1]
    if points < last:
        return (1,) * (len(shape) - 1) + (points,)
    rows = points // last
    lead = list(shape[:-1])
    out = []
    for n in reversed(lead):
        take = max(1, min(n, rows))
        out.append(take)
        rows = max(1, rows // n) if take == n else 1
    return tuple(reversed(out)) + (last,)
