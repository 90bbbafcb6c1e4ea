"""The labelled result of an evaluation: values per metric, coordinates, provenance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Landscape", "default_dims"]


def default_dims(ndim: int) -> tuple[str, ...]:
    """``("x",)``, ``("x", "y")``, ``("x", "y", "z")``, then ``d3``, ``d4``…"""
    names = ("x", "y", "z")
    return tuple(names[i] if i < 3 else f"d{i}" for i in range(ndim))


@dataclass
class Landscape:
    """Metric values on a grid.

    Attributes:
        values: metric name → array shaped like the grid (``ij`` order).
        axes: one coordinate array per grid axis.
        dims: axis names.
        metadata: how it was computed (strategy, directions, versions…), JSON-able.
    """

    values: dict[str, np.ndarray]
    axes: tuple[np.ndarray, ...]
    dims: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(np.asarray(a, dtype=np.float64) for a in self.axes)
        self.dims = tuple(self.dims) if self.dims is not None else default_dims(len(self.axes))
        shape = tuple(a.size for a in self.axes)
        for name, v in self.values.items():
            if np.shape(v) != shape:
                raise ValueError(f"Landscape: values[{name!r}] has shape {np.shape(v)}, grid is {shape}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset``: one variable per metric, coordinates per axis, attrs = metadata."""
        import xarray as xr

        return xr.Dataset(
            {name: (self.dims, np.asarray(v)) for name, v in self.values.items()},
            coords={d: a for d, a in zip(self.dims, self.axes, strict=True)},
            attrs=_jsonable(self.metadata),
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


