"""Several landscapes on one plane as an animation, with the training trajectory growing.

One frame per landscape (e.g. one per checkpoint, all evaluated on one shared plane), drawn
as filled contours on one colour scale (the range over every frame) and one set of axes;
the trajectory (e.g. :func:`landscapes.trajectory.project_trajectory`'s coordinates) is
drawn up to the frame's checkpoint. A GIF is written with Pillow through matplotlib's
``PillowWriter``; an MP4 next to it with ``FFMpegWriter`` when ``ffmpeg`` is on the path.

Landscapes drawn on different planes cannot share axes: every dataset must have the same
coordinates (refused otherwise). Figures are ``matplotlib.figure.Figure`` objects, never
pyplot, so the user's backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landscapes.errors import ConfigurationError, ShapeMismatchError
from landscapes.integrity import atomic_file

__all__ = ["animate"]

_CMAP = "viridis"


def animate(
    datasets: Sequence[Any],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    metric: str = "loss",
    trajectory: Any = None,
    upto: Sequence[int] | None = None,
    log: bool = True,
    fps: float = 2.0,
    levels: int = 30,
    figsize: tuple[float, float] = (6.0, 5.0),
    dpi: int = 100,
    mp4: bool = True,
) -> dict[str, Path]:
    """Write an animation of 2-D landscapes on one plane and one colour scale.

    Args:
        datasets: F landscapes (``xarray.Dataset`` or objects with ``to_xarray()``), all on
            the same grid; frame f draws ``datasets[f]``.
        labels: F frame titles (e.g. ``"epoch 3"``).
        path: the GIF to write (``.gif``); the MP4 goes next to it with suffix ``.mp4``.
        metric: the variable to draw.
        trajectory: ``(m, 2)`` plane coordinates of the trajectory's checkpoints in order (an
            array, or a ``Projection``: its first two coordinates), or None.
        upto: per frame, the index of the last trajectory point drawn; default frame f shows
            points ``0..f`` when m == F, else the first ``round((f + 1)·m/F)`` points.
        log: draw ``log10`` of the metric (non-positive values left blank).
        fps: frames per second.
        levels: number of contour bands over the shared range.
        figsize, dpi: size of a frame, ``figsize·dpi`` pixels.
        mp4: also write an MP4 when ffmpeg is installed (skipped silently otherwise).

    Returns:
        ``{"gif": path}``, plus ``"mp4"`` when one was written.

    Raises:
        ConfigurationError: no datasets, labels of another length, an unknown or non-2-D
            metric, nothing finite to draw, a path not ending in ``.gif``, bad options.
        ShapeMismatchError: the datasets are on different grids, or the trajectory's shape.
    """
    where = "animate"
    fields, coords, dims = _fields(datasets, metric, where)
    if isinstance(labels, str) or len(labels) != len(fields):
        raise ConfigurationError(
            f"{where}: {len(fields)} datasets but "
            f"{'a string' if isinstance(labels, str) else len(labels)} labels; give one label per dataset."
        )
    target = Path(path)
    if target.suffix.lower() != ".gif":
        raise ConfigurationError(f"{where}: path={str(path)!r} must end in .gif (the MP4 is written next to it).")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (np.isfinite(fps) and fps > 0):
        raise ConfigurationError(f"{where}: fps={fps!r}: expected a positive number of frames per second.")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ConfigurationError(f"{where}: levels={levels!r}: give at least 2 contour levels.")
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            fields = [np.where(f > 0, np.log10(np.where(f > 0, f, 1.0)), np.nan) for f in fields]
    finite = [f[np.isfinite(f)] for f in fields]
    if not any(v.size for v in finite):
        raise ConfigurationError(
            f"{where}: metric {metric!r} has no {'positive' if log else 'finite'} value in any "
            f"dataset; {'pass log=False or ' if log else ''}evaluate the landscapes first."
        )
    lo = min(float(v.min()) for v in finite if v.size)
    hi = max(float(v.max()) for v in finite if v.size)
    if hi <= lo:
        pad = abs(lo) * 1e-3 or 1e-3
        lo, hi = lo - pad, hi + pad
    from matplotlib.ticker import MaxNLocator

    bands = MaxNLocator(nbins=levels).tick_values(lo, hi)  # round values covering [lo, hi]
    points = _trajectory(trajectory, where)
    shown = _upto(upto, points, len(fields), where)

    from matplotlib import colormaps
    from matplotlib.animation import FFMpegWriter, PillowWriter
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure

    cmap = colormaps[_CMAP]
    norm = BoundaryNorm(bands, cmap.N)
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes((0.12, 0.1, 0.62, 0.8))
    cax = fig.add_axes((0.78, 0.1, 0.035, 0.8))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=f"log10 {metric}" if log else metric)
    bar.locator = MaxNLocator(nbins=6)
    bar.update_ticks()

    def draw(f: int) -> None:
        ax.clear()
        ax.contourf(coords[0], coords[1], np.ma.masked_invalid(fields[f].T), levels=bands, cmap=cmap, norm=norm)
        if points is not None and shown[f] >= 0:
            seen = points[: shown[f] + 1]
            ax.plot(seen[:, 0], seen[:, 1], "-o", color="white", markeredgecolor="black",
                    markersize=4, linewidth=1.5, zorder=4)
            ax.plot(seen[-1:, 0], seen[-1:, 1], "*", color="red", markeredgecolor="black",
                    markersize=14, zorder=5)
        ax.set_xlim(coords[0][0], coords[0][-1])
        ax.set_ylim(coords[1][0], coords[1][-1])
        ax.set_xlabel(dims[0])
        ax.set_ylabel(dims[1])
        ax.set_title(str(labels[f]))

    written: dict[str, Path] = {}
    writers = [("gif", PillowWriter(fps=fps), target)]
    if mp4 and FFMpegWriter.isAvailable():
        writers.append(("mp4", FFMpegWriter(fps=fps), target.with_suffix(".mp4")))
    for kind, writer, out in writers:
        with atomic_file(out) as tmp, writer.saving(fig, tmp, dpi):
            for f in range(len(fields)):
                draw(f)
                writer.grab_frame()
        written[kind] = out
    fig.clear()
    return written


# ------------------------------------------------------------------------------- helpers
def _fields(datasets: Sequence[Any], metric: str, where: str) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    import xarray as xr

    if isinstance(datasets, (xr.Dataset, str)) or len(datasets) == 0:
        raise ConfigurationError(f"{where}: datasets must be a non-empty list of landscapes (one per frame).")
    fields, first = [], None
    for n, obj in enumerate(datasets):
        ds = obj if isinstance(obj, xr.Dataset) else getattr(obj, "to_xarray", None)
        if not isinstance(ds, xr.Dataset):
            if not callable(ds):
                raise ConfigurationError(
                    f"{where}: datasets[{n}] is a {type(obj).__name__}; give xarray Datasets or "
                    "objects with to_xarray() (Landscape, LandscapeStore)."
                )
            ds = ds()
        if metric not in ds.data_vars:
            raise ConfigurationError(
                f"{where}: metric={metric!r} is not in datasets[{n}]; choose one of {sorted(map(str, ds.data_vars))}."
            )
        da = ds[metric]
        if da.ndim != 2:
            raise ConfigurationError(f"{where}: datasets[{n}][{metric!r}] has {da.ndim} dims {da.dims}; frames need 2-D landscapes.")
        dims = [str(d) for d in da.dims]
        values = np.asarray(da.values, dtype=np.float64)
        coords = [
            np.asarray(ds[d].values, dtype=np.float64) if d in ds.coords else np.arange(k, dtype=np.float64)
            for d, k in zip(dims, values.shape, strict=True)
        ]
        if first is None:
            first = (coords, dims)
        elif dims != first[1] or any(not np.array_equal(a, b) for a, b in zip(coords, first[0], strict=True)):
            raise ShapeMismatchError(
                f"{where}: datasets[{n}] is on another grid than datasets[0] (dims {dims} vs "
                f"{first[1]}, or other coordinates); animate landscapes evaluated on one shared "
                "plane and grid, or plot them side by side instead."
            )
        fields.append(np.where(np.isfinite(values), values, np.nan))
    assert first is not None
    return fields, first[0], first[1]


def _trajectory(trajectory: Any, where: str) -> np.ndarray | None:
    if trajectory is None:
        return None
    coords = getattr(trajectory, "coords", trajectory)  # a Projection
    points = np.asarray(coords, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] < 2 or points.shape[0] == 0:
        raise ShapeMismatchError(
            f"{where}: trajectory has shape {points.shape}; give (m, 2) plane coordinates, one row per checkpoint."
        )
    return points[:, :2]


def _upto(upto: Sequence[int] | None, points: np.ndarray | None, frames: int, where: str) -> list[int]:
    if points is None:
        return [-1] * frames
    m = points.shape[0]
    if upto is None:
        return [f if m == frames else int(round((f + 1) * m / frames)) - 1 for f in range(frames)]
    out = [int(u) for u in upto]
    if len(out) != frames or any(not -1 <= u < m for u in out):
        raise ConfigurationError(
            f"{where}: upto={list(upto)!r}: give one index in [-1, {m - 1}] per frame ({frames} frames)."
        )
    return out
