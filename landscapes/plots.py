"""Plots of landscapes: contour, filled contour, 3-D surface, 1-D curves (PNG) and plotly HTML.

Every function takes an ``xarray.Dataset`` (e.g. ``LandscapeStore.to_xarray()``) or any object
with a ``to_xarray()`` method (``Landscape``, ``LandscapeStore``). Metric values ``v[i, j]``
sit at ``(coords[dims[0]][i], coords[dims[1]][j])`` (``ij`` order).

Labels come from the dataset's attrs (the provenance a pipeline store carries), each with a
fallback for plain datasets:

- axis names: a coordinate's ``long_name`` attr, else ``attrs["directions"]`` (``kind``,
  ``seeds``, ``normalization``, ``towards``), e.g. "direction 1 (filter-normalized Gaussian,
  seed 0)" or "towards epoch_030", else "direction 1" for the default dims ``x``/``y``;
- titles: metric, checkpoint (``attrs["checkpoint"]["source"]`` or ``["path"]``, else
  ``attrs["name"]``) and grid, e.g. "loss (log10) · epoch_010 · 21×21 plane";
- reference points: θ0 at the origin; for ``directions.kind == "checkpoints"`` (unnormalized)
  the other checkpoints at their unit coordinates, named;
- the plane a landscape lies on (comparisons): see `plane_id`.

matplotlib figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so
nothing here changes the user's backend or leaves figures open; PNGs are rendered by Agg.
HTML pages load ``plotly.min.js`` from beside them (written once per folder), so they stay
small and work offline. Heavy imports (matplotlib, plotly, xarray) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscapes.errors import ConfigurationError

if TYPE_CHECKING:
    import plotly.graph_objects
    import xarray
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLANE_ATTR",
    "checkpoint_name",
    "comparison_figure",
    "html_figure",
    "nice_ticks",
    "plane_groups",
    "plane_id",
    "plot_comparison",
    "plot_contour",
    "plot_curve",
    "plot_html",
    "plot_surface",
    "plot_trajectory",
    "render_all",
    "round_coordinate",
]

DPI = 100
"""Resolution of written PNGs; a figure of ``figsize=(w, h)`` becomes ``w*DPI × h*DPI`` pixels."""

COLOR_SCALE_KEY = "landscapes:color_scale"
"""PNG text chunk of comparison plots: JSON with the shared ``vmin``/``vmax``."""

PLANE_ATTR = "landscapes.plane"
"""Dataset attr naming the plane (or line) a landscape lies on; wins over the derived id."""

PLOTLY_JS = "plotly.min.js"
"""What ``include_plotlyjs="directory"`` writes beside each HTML page (once per folder)."""

_CMAP = "viridis"
_DIFF_CMAP = "RdBu_r"
_NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)
_DEFAULT_DIMS = ("x", "y", "z")
_NORMALIZED = {"filter": "filter-normalized", "layer": "layer-normalized", "model": "model-normalized"}
_REF_STYLES = (("o", "#d62728"), ("D", "#ff7f0e"), ("s", "#e377c2"))  # tab:red, orange, pink
_PLOTLY_SYMBOLS = {"*": "star", "o": "circle", "D": "diamond", "s": "square"}

# --------------------------------------------------------------------------- input handling
def _as_dataset(obj: Any) -> xarray.Dataset:
    import xarray

    if isinstance(obj, xarray.Dataset):
        return obj
    if isinstance(obj, xarray.DataArray):
        return obj.to_dataset(name=obj.name or "value")
    to_xarray = getattr(obj, "to_xarray", None)
    if callable(to_xarray):
        return _as_dataset(to_xarray())
    raise ConfigurationError(
        f"cannot plot a {type(obj).__name__}; pass an xarray.Dataset or an object with a "
        "to_xarray() method (Landscape, LandscapeStore)."
    )


def _field(
    ds: xarray.Dataset, metric: str, ndim: int | None, where: str
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Values (float64, non-finite → NaN), coordinate arrays and dim names of one metric."""
    if metric not in ds.data_vars:
        raise ConfigurationError(
            f"{where}: metric={metric!r} is not in the dataset; choose one of "
            f"{sorted(map(str, ds.data_vars))}."
        )
    da = ds[metric]
    if ndim is not None and da.ndim != ndim:
        raise ConfigurationError(
            f"{where}: metric {metric!r} has {da.ndim} dims {da.dims}; this plot needs a "
            f"{ndim}-D landscape."
        )
    values = np.asarray(da.values, dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    dims = [str(d) for d in da.dims]
    coords = [
        np.asarray(ds[d].values, dtype=np.float64) if d in ds.coords else np.arange(n, dtype=float)
        for d, n in zip(dims, values.shape, strict=True)
    ]
    return values, coords, dims


def _metric_label(metric: str, log: bool) -> str:
    return f"{metric} (log10)" if log else metric


def _transform(values: np.ndarray, log: bool, metric: str, where: str) -> tuple[np.ndarray, str]:
    """Apply ``log10`` (non-positive → NaN) when asked; refuse an all-NaN field."""
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
    if not np.isfinite(values).any():
        fix = "pass log=False or evaluate some tiles" if log else "evaluate some tiles first"
        raise ConfigurationError(
            f"{where}: metric {metric!r} has no {'positive' if log else 'finite'} values, so "
            f"there is nothing to plot; {fix}."
        )
    return values, _metric_label(metric, log)


# --------------------------------------------------------------------------- provenance → labels
def checkpoint_name(ref: str) -> str:
    """Short name of a checkpoint path or URI: ``/a/epoch_010.pt`` → ``epoch_010``.

    ``runs:/<id>/ckpt/epoch_010.pt`` gives ``epoch_010``; ``models:/demo/3`` gives ``demo/3``.

    >>> checkpoint_name("outputs/checkpoints/epoch_010.pt")
    'epoch_010'
    """
    text = str(ref).rstrip("/")
    scheme, sep, rest = text.partition(":/")
    if sep and scheme == "models":
        return rest.lstrip("/")
    name = text.rsplit("/", 1)[-1]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def _directions_attrs(ds: xarray.Dataset) -> Mapping[str, Any]:
    dirs = ds.attrs.get("directions")
    return dirs if isinstance(dirs, Mapping) else {}


def _normalization(dirs: Mapping[str, Any]) -> str | None:
    value = dirs.get("normalization")
    text = "" if value is None else str(value).strip().lower()
    return None if text in ("", "none", "null") else text


def _checkpoint_name(ds: xarray.Dataset, key: str = "checkpoint") -> str | None:
    ck = ds.attrs.get(key)
    ref = ck.get("source") or ck.get("path") if isinstance(ck, Mapping) else ck
    return checkpoint_name(str(ref)) if ref else None


def _origin_name(ds: xarray.Dataset) -> str | None:
    """The checkpoint at θ0: ``attrs["plane"]["origin"]`` on a shared plane, else ``attrs["checkpoint"]``
    (``source``, then ``path``)."""
    plane = ds.attrs.get("plane")
    if isinstance(plane, Mapping) and plane.get("mode") == "shared" and isinstance(plane.get("origin"), Mapping):
        return checkpoint_name(str(plane["origin"].get("source") or "")) or None
    return _checkpoint_name(ds)


def _subject(ds: xarray.Dataset) -> str | None:
    """What the landscape is of, for titles: its checkpoint, else ``attrs["name"]``."""
    name = _checkpoint_name(ds) or ds.attrs.get("name")
    return str(name) if name else None


def _orthogonalized(dirs: Mapping[str, Any]) -> bool:
    return dirs.get("cosine_after_orthogonalization") is not None


def _axis_labels(ds: xarray.Dataset, dims: Sequence[str]) -> list[str]:
    """One label per dim: ``long_name``, else the directions' provenance, else a plain name."""
    dirs = _directions_attrs(ds)
    kind = str(dirs.get("kind") or "")
    norm = _normalization(dirs)
    seeds = list(dirs.get("seeds") or [])
    towards = list(dirs.get("towards") or [])
    labels = []
    for i, dim in enumerate(dims):
        long_name = ds[dim].attrs.get("long_name") if dim in ds.coords else None
        extra = ["orthogonalized"] if i == 1 and _orthogonalized(dirs) else []
        normalized = _NORMALIZED.get(norm or "", f"{norm}-normalized") if norm else None
        if long_name:
            labels.append(str(long_name))
        elif kind == "random" and i < len(seeds):
            what = f"{normalized} Gaussian" if normalized else "Gaussian"
            labels.append(f"direction {i + 1} ({', '.join([what, f'seed {seeds[i]}', *extra])})")
        elif kind == "checkpoints" and i < len(towards):
            notes = [n for n in (normalized, *extra) if n]
            name = checkpoint_name(str(towards[i]))
            labels.append(f"towards {name}" + (f" ({', '.join(notes)})" if notes else ""))
        elif kind == "pca" and i < len(dirs.get("explained_variance_ratio") or ()):
            share = float(dirs["explained_variance_ratio"][i])
            labels.append(f"principal direction {i + 1} ({100 * share:.1f} % of the trajectory)")
        elif kind:
            labels.append(f"direction {i + 1} ({kind})")
        else:
            labels.append(f"direction {i + 1}" if dim in _DEFAULT_DIMS else dim)
    return labels


def _grid_text(shape: Sequence[int], *, plural: bool = False) -> str:
    s = "s" if plural else ""
    if len(shape) == 1:
        return f"{shape[0]}-point line{s}"
    if len(shape) == 2:
        return f"{shape[0]}×{shape[1]} plane{s}"
    return "×".join(map(str, shape)) + f" grid{s}"


def _title(ds: xarray.Dataset, what: str, shape: Sequence[int]) -> str:
    return " · ".join(p for p in (what, _subject(ds), _grid_text(shape)) if p)


@dataclass(frozen=True)
class _Ref:
    """A point of parameter space the plot marks: θ0 or another checkpoint."""

    label: str
    at: tuple[float, ...]
    index: int  # 0: θ0; i: the checkpoint of direction i


def _reference_points(
    ds: xarray.Dataset, coords: Sequence[np.ndarray], *, named_origin: bool = True
) -> list[_Ref]:
    """θ0 at the origin and, for unnormalized checkpoint directions, each checkpoint at its
    unit coordinate (θ0 + 1·(θi − θ0)); only those inside the grid's range."""
    k = len(coords)
    origin = _origin_name(ds) if named_origin else None
    refs = [_Ref(f"θ0 ({origin})" if origin else "θ0", (0.0,) * k, 0)]
    dirs = _directions_attrs(ds)
    towards = list(dirs.get("towards") or [])
    if str(dirs.get("kind")) == "checkpoints" and _normalization(dirs) is None:
        for i, ref in enumerate(towards[:k]):
            if i == 1 and _orthogonalized(dirs):
                continue  # the second direction was changed: θ2 is off the plane's (0, 1)
            at = tuple(1.0 if j == i else 0.0 for j in range(k))
            refs.append(_Ref(checkpoint_name(str(ref)), at, i + 1))
    return [r for r in refs if all(_within(c, x) for c, x in zip(coords, r.at, strict=True))]


def _within(coords: np.ndarray, x: float) -> bool:
    lo, hi = float(np.min(coords)), float(np.max(coords))
    tol = 1e-9 * max(hi - lo, 1.0)
    return lo - tol <= x <= hi + tol


def _ref_style(ref: _Ref) -> dict[str, Any]:
    if ref.index == 0:
        return {"marker": "*", "markersize": 15, "color": "white", "markeredgecolor": "black"}
    marker, color = _REF_STYLES[(ref.index - 1) % len(_REF_STYLES)]
    return {"marker": marker, "markersize": 9, "color": color, "markeredgecolor": "black"}


def _value_at(coords: Sequence[np.ndarray], z: np.ndarray, at: Sequence[float]) -> float:
    """Multilinear interpolation of ``z`` (``ij`` order) at ``at``; NaN where a corner is NaN."""
    idx, weights = [], []
    for c, x in zip(coords, at, strict=True):
        order = np.argsort(c)
        cs = c[order]
        if cs.size == 1:
            idx.append((order[0], order[0]))
            weights.append(0.0)
            continue
        j = int(np.clip(np.searchsorted(cs, x) - 1, 0, cs.size - 2))
        w = float((x - cs[j]) / (cs[j + 1] - cs[j]))
        idx.append((order[j], order[j + 1]))
        weights.append(min(max(w, 0.0), 1.0))
    total = 0.0
    for corner in np.ndindex(*([2] * len(coords))):
        w = math.prod(wt if c else 1.0 - wt for c, wt in zip(corner, weights, strict=True))
        if w == 0.0:
            continue
        total += w * float(z[tuple(pair[c] for pair, c in zip(idx, corner, strict=True))])
    return total


def plane_id(landscape_or_ds: Any) -> str | None:
    """Identity of the plane (or line) a landscape lies on, or None when nothing says.

    Two landscapes on one plane share θ0 and their directions, so they can be subtracted
    point by point. The id is ``attrs["landscapes.plane"]`` (`PLANE_ATTR`) when set; else a
    digest of ``attrs["directions"]`` (its ``sha256`` when present, else its provenance:
    kind, seeds, normalization, towards, norms) with the θ0 checkpoint's ``sha256``.

    Returns:
        A string id, or None for a dataset without that provenance.
    """
    ds = _as_dataset(landscape_or_ds)
    explicit = ds.attrs.get(PLANE_ATTR)
    if explicit:
        return str(explicit)
    dirs = _directions_attrs(ds)
    if not dirs:
        return None
    ck = ds.attrs.get("checkpoint")
    origin = ck.get("sha256") if isinstance(ck, Mapping) else None
    basis = dirs.get("sha256") or {k: v for k, v in dirs.items() if k != "parameters"}
    text = json.dumps({"directions": basis, "origin": origin}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plane_groups(datasets: Sequence[Any], planes: Sequence[str | None] | None = None) -> list[list[int]]:
    """Indices of ``datasets`` grouped by plane, groups in order of first appearance.

    Args:
        datasets: landscapes (``xarray.Dataset`` or objects with ``to_xarray()``).
        planes: one plane id per dataset (e.g. the MLflow tag ``landscapes.directions``);
            a None entry, or no list, takes `plane_id` of the dataset. Datasets without any
            plane information form one group: the caller vouches that they share a plane.

    Returns:
        Lists of indices, one list per plane.
    """
    datasets = list(datasets)
    given = list(planes) if planes is not None else [None] * len(datasets)
    if len(given) != len(datasets):
        raise ConfigurationError(
            f"plane_groups: got {len(datasets)} datasets and {len(given)} planes; pass one plane "
            "id (or None) per dataset."
        )
    groups: dict[str | None, list[int]] = {}
    for n, (ds, plane) in enumerate(zip(datasets, given, strict=True)):
        key = plane if plane is not None else plane_id(ds)
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def round_coordinate(value: float, coords: Sequence[float] | np.ndarray) -> float:
    """A coordinate read from a grid axis without its float noise: 12 significant digits of the
    axis' scale, so ``-0.09999999999999998`` on a ``[-1, 1]`` axis reads ``-0.1``.

    Args:
        value: a coordinate of ``coords`` (or any value on its scale).
        coords: the axis it came from, shape ``(n,)``.

    Returns:
        ``value`` rounded to ``12 - ceil(log10(max |coords|))`` decimals.

    >>> round_coordinate(-0.09999999999999998, [-1.0, 1.0])
    -0.1
    """
    scale = float(np.max(np.abs(np.asarray(coords, dtype=np.float64)), initial=0.0)) or abs(value)
    if not math.isfinite(value) or scale == 0.0 or not math.isfinite(scale):
        return float(value)
    rounded = round(float(value), 12 - math.ceil(math.log10(scale)))
    return rounded + 0.0  # no -0.0


# --------------------------------------------------------------------------- scales and ticks
def nice_ticks(lo: float, hi: float, n: int = 6) -> np.ndarray:
    """At most about ``n`` round values (1, 2, 2.5 or 5 × 10^k apart) inside ``[lo, hi]``.

    >>> nice_ticks(-1.37, 0.52).tolist()
    [-1.0, -0.5, 0.0, 0.5]
    """
    from matplotlib.ticker import MaxNLocator

    if not hi > lo:
        return np.asarray([lo], dtype=np.float64)
    ticks = MaxNLocator(nbins=n, steps=list(_NICE_STEPS)).tick_values(lo, hi)
    tol = 1e-9 * (hi - lo)
    ticks = ticks[(ticks >= lo - tol) & (ticks <= hi + tol)]
    step = float(ticks[1] - ticks[0]) if ticks.size > 1 else 1.0
    return np.round(np.round(ticks / step) * step, 12) + 0.0  # exact multiples, no -0.0


def _limits(values: np.ndarray) -> tuple[float, float]:
    return float(np.nanmin(values)), float(np.nanmax(values))


def _level_array(lo: float, hi: float, levels: int | Sequence[float]) -> np.ndarray:
    if not isinstance(levels, (int, np.integer)):
        return np.asarray(levels, dtype=np.float64)
    if int(levels) < 2:
        raise ConfigurationError(f"levels={levels}: give at least 2 contour levels.")
    from matplotlib.ticker import MaxNLocator

    if hi <= lo:  # constant field: a band around the value
        pad = abs(lo) * 1e-3 or 1e-3
        lo, hi = lo - pad, hi + pad
    # round values covering [lo, hi], 1, 2, 2.5 or 5 × 10^k apart
    return MaxNLocator(nbins=int(levels), steps=list(_NICE_STEPS)).tick_values(lo, hi)


def _colorbar(fig: Figure, mappable: Any, axes: Any, label: str, lo: float, hi: float, **kw: Any) -> Any:
    cbar = fig.colorbar(mappable, ax=axes, label=label, **kw)
    cbar.set_ticks(nice_ticks(lo, hi))
    return cbar


def _plotly_colorscale(name: str = _CMAP, n: int = 16) -> list[list[Any]]:
    """The matplotlib colour map as a plotly colour scale, so HTML and PNG colours agree."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    return [
        [i / (n - 1), "rgb({},{},{})".format(*(round(255 * c) for c in cmap(i / (n - 1))[:3]))]
        for i in range(n)
    ]


# --------------------------------------------------------------------------- matplotlib helpers
def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


def _save_png(fig: Figure, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata=metadata)
    fig.clear()
    return path


def _mark_2d(ax: Axes, refs: Sequence[_Ref], *, annotate: bool = True) -> list[Any]:
    """Markers (and name tags) of the reference points; returns the legend handles."""
    handles = []
    for ref in refs:
        (line,) = ax.plot(
            [ref.at[0]], [ref.at[1]], linestyle="none", label=ref.label, zorder=5, clip_on=False,
            **_ref_style(ref),
        )
        handles.append(line)
        if annotate and ref.index > 0:
            ax.annotate(
                ref.label, (ref.at[0], ref.at[1]), xytext=(6, 6), textcoords="offset points",
                fontsize="small", zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            )
    return handles


def _legend(fig: Figure, ax: Axes, handles: list[Any], *, own: bool) -> None:
    """A legend off the data: below the figure for our own figures, right of ``ax`` otherwise."""
    if not handles:
        return
    if own:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 4),
            fontsize="small", frameon=False,
        )
    else:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")


# --------------------------------------------------------------------------- matplotlib plots
def plot_contour(
    landscape_or_ds: Any,
    metric: str = "loss",
    *,
    filled: bool = False,
    levels: int | Sequence[float] = 30,
    log: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Contour (or filled contour) of a 2-D landscape, with its reference points marked.

    Axis names, title and reference points (θ0; the other checkpoints of a three-checkpoint
    plane) come from the dataset's attrs (see the module docstring); colour-bar ticks are
    round numbers; the legend sits below the figure (right of ``ax`` when one is given).

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        filled: filled contours (``contourf``) instead of lines.
        levels: number of evenly spaced levels, or explicit level values.
        log: plot ``log10`` of the metric (non-positive values left blank).
        ax: draw into this axes instead of a new figure.
        title: axes title; default "<metric> · <checkpoint> · <grid>".

    Returns:
        The figure holding the plot.

    Raises:
        ConfigurationError: unknown metric, not 2-D, or nothing finite to plot.
    """
    ds = _as_dataset(landscape_or_ds)
    values, coords, dims = _field(ds, metric, 2, "plot_contour")
    z, label = _transform(values, log, metric, "plot_contour")
    lo, hi = _limits(z)
    own = ax is None
    if ax is None:
        fig = _new_figure((6.0, 5.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    zm = np.ma.masked_invalid(z.T)  # matplotlib wants z[row=y, col=x]
    lv = _level_array(lo, hi, levels)
    draw = ax.contourf if filled else ax.contour
    cs = draw(coords[0], coords[1], zm, levels=lv, cmap=_CMAP)
    _colorbar(fig, cs, ax, label, float(lv[0]), float(lv[-1]))
    xl, yl = _axis_labels(ds, dims)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title if title is not None else _title(ds, label, values.shape), fontsize="medium")
    _legend(fig, ax, _mark_2d(ax, _reference_points(ds, coords)), own=own)
    return fig


#: A plane that explains less of a trajectory's squared displacement than this says so on the plot.
LOW_EXPLAINED = 0.5


def plot_trajectory(
    landscape_or_ds: Any,
    coords: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[str],
    metric: str = "loss",
    *,
    log: bool = False,
    explained: float | None = None,
    title: str | None = None,
) -> Figure:
    """Filled contour of a 2-D landscape with checkpoints drawn over it, joined in order.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``; 2-D.
        coords: ``(m, 2)`` plane coordinates of the checkpoints (e.g. ``Projection.coords``),
            in training order.
        labels: m names written beside the points (e.g. ``"epoch_010"``).
        metric: data variable to plot.
        log: plot ``log10`` of the metric.
        explained: the share of the trajectory's squared displacement the plane explains; below
            `LOW_EXPLAINED` the plot says that the points are projections of checkpoints far from it.
        title: axes title; default the contour's.

    Returns:
        The figure.

    Raises:
        ConfigurationError: coordinates not ``(m, 2)``, labels of another length, or the
            landscape cannot be drawn (see :func:`plot_contour`).
    """
    pts = np.asarray(coords, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(labels) != pts.shape[0]:
        raise ConfigurationError(
            f"plot_trajectory: coords have shape {pts.shape} and there are {len(labels)} labels; give (m, 2) "
            "coordinates and one label per checkpoint."
        )
    fig = plot_contour(landscape_or_ds, metric, filled=True, log=log, title=title)
    ax = fig.axes[0]
    ax.plot(pts[:, 0], pts[:, 1], "-", color="white", linewidth=1.5, zorder=6)
    ax.plot(pts[:, 0], pts[:, 1], "o", color="#d62728", markeredgecolor="black", markersize=6, zorder=7,
            clip_on=False)
    for (x, y), label in zip(pts, labels, strict=True):
        ax.annotate(str(label), (x, y), xytext=(5, -10), textcoords="offset points", fontsize="x-small", zorder=8,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    if explained is not None:
        low = explained < LOW_EXPLAINED
        text = (f"the plane explains only {100 * explained:.0f} % of the displacement:\nthe points are projections "
                "of checkpoints far from it" if low else f"the plane explains {100 * explained:.0f} % of the displacement")
        ax.text(0.01, 0.99, text, transform=ax.transAxes, va="top", ha="left", fontsize="x-small", zorder=9,
                color="#b00000" if low else "black",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#b00000" if low else "none", "alpha": 0.85})
    return fig


def plot_surface(landscape_or_ds: Any, metric: str = "loss", *, log: bool = False) -> Figure:
    """3-D surface of a 2-D landscape, with its reference points marked on the surface.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        log: plot ``log10`` of the metric.

    Returns:
        The figure.

    Raises:
        ConfigurationError: unknown metric, not 2-D, or nothing finite to plot.
    """
    ds = _as_dataset(landscape_or_ds)
    values, coords, dims = _field(ds, metric, 2, "plot_surface")
    z, label = _transform(values, log, metric, "plot_surface")
    lo, hi = _limits(z)
    fig = _new_figure((7.0, 5.5))
    ax = fig.add_subplot(projection="3d", computed_zorder=False)
    xx, yy = np.meshgrid(coords[0], coords[1], indexing="ij")
    surf = ax.plot_surface(
        xx,
        yy,
        np.ma.masked_invalid(z),
        cmap=_CMAP,
        vmin=lo,
        vmax=hi,
        linewidth=0,
        antialiased=False,
        rstride=1,
        cstride=1,
        zorder=1,
    )
    _colorbar(fig, surf, ax, label, lo, hi, shrink=0.7)
    xl, yl = _axis_labels(ds, dims)
    ax.set_xlabel(xl, fontsize="small")
    ax.set_ylabel(yl, fontsize="small")
    ax.set_zlabel(label, fontsize="small")
    ax.set_title(_title(ds, label, values.shape), fontsize="medium")
    handles = []
    for ref in _reference_points(ds, coords):
        height = _value_at(coords, z, ref.at)
        if not math.isfinite(height):
            continue
        style = _ref_style(ref)
        (line,) = ax.plot(
            [ref.at[0]], [ref.at[1]], [height], linestyle="none", label=ref.label, zorder=5, **style
        )
        handles.append(line)
        if ref.index > 0:
            ax.text(ref.at[0], ref.at[1], height, f"  {ref.label}", fontsize="small", zorder=6)
    _legend(fig, ax, handles, own=True)
    return fig


def _is_accuracy(name: str) -> bool:
    return "acc" in name.lower()


def plot_curve(
    landscape_or_ds: Any, metrics: Sequence[str] | str = ("loss",), *, log: bool = False
) -> Figure:
    """Curves of a 1-D landscape; accuracy-like metrics go on a twin y-axis beside the others.

    θ0 (t = 0) and, for a line towards another checkpoint, that checkpoint (t = 1) are marked
    by vertical lines, named on a top axis and in the legend below the figure.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metrics: data variables to draw.
        log: log-scale y-axis for the non-accuracy metrics.

    Returns:
        The figure.

    Raises:
        ConfigurationError: unknown metric, not 1-D, or nothing finite to plot.
    """
    ds = _as_dataset(landscape_or_ds)
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise ConfigurationError("plot_curve: metrics is empty; name at least one metric.")
    fields = {}
    for m in metrics:
        values, coords, dims = _field(ds, m, 1, "plot_curve")
        _transform(values, False, m, "plot_curve")
        fields[m] = (values, coords[0], dims[0])
    left = [m for m in metrics if not _is_accuracy(m)] or list(metrics)
    right = [m for m in metrics if m not in left]
    fig = _new_figure((6.5, 4.5))
    ax = fig.add_subplot()
    handles = []
    for n, m in enumerate(left):
        values, x, _ = fields[m]
        handles += ax.plot(x, values, color=f"C{n}", marker=".", label=m)
    ax.set_ylabel(", ".join(left) + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
    if right:
        ax2 = ax.twinx()
        for n, m in enumerate(right, start=len(left)):
            values, x, _ = fields[m]
            handles += ax2.plot(x, values, color=f"C{n}", marker=".", linestyle="--", label=m)
        ax2.set_ylabel(", ".join(right))
    values0, x0, dim = fields[metrics[0]]
    ax.set_xlabel(_axis_labels(ds, [dim])[0])
    handles += _mark_1d(ax, _reference_points(ds, [x0]))
    _legend(fig, ax, handles, own=True)
    ax.set_title(_title(ds, ", ".join(metrics), values0.shape), fontsize="medium")
    return fig


def _mark_1d(ax: Axes, refs: Sequence[_Ref], *, top_axis: bool = True) -> list[Any]:
    """Vertical lines at the reference points, named on a top axis; returns legend handles."""
    handles = []
    for ref in refs:
        style = _ref_style(ref)
        handles.append(
            ax.axvline(
                ref.at[0], color="0.35" if ref.index == 0 else style["color"],
                linestyle=":" if ref.index == 0 else "--", linewidth=1.2, label=ref.label, zorder=1,
            )
        )
    if refs and top_axis:
        top = ax.secondary_xaxis("top")
        top.set_xticks([r.at[0] for r in refs], labels=[r.label for r in refs], fontsize="small")
    return handles


# --------------------------------------------------------------------------- plotly HTML
def _check_plotlyjs(include_plotlyjs: bool | str) -> None:
    if include_plotlyjs not in (True, "directory"):
        raise ConfigurationError(
            f"include_plotlyjs={include_plotlyjs!r} needs network access to view; use "
            "'directory' (one plotly.min.js beside the page) or True (embedded, ~5 MB a page) "
            "so the page works offline."
        )


def _write_html(fig: plotly.graph_objects.Figure, path: str | os.PathLike, include_plotlyjs: bool | str) -> Path:
    _check_plotlyjs(include_plotlyjs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(out, include_plotlyjs=include_plotlyjs, full_html=True)
    return out


def _plotly_axis(title: str) -> dict[str, Any]:
    return {"title": {"text": title}, "zeroline": False}


def html_figure(landscape_or_ds: Any, metric: str = "loss", *, log: bool = False) -> plotly.graph_objects.Figure:
    """The plotly figure of `plot_html`: surface + filled contour for 2-D, a line for 1-D.

    One colour bar (the surface's; the contour uses the same scale and levels), the PNGs'
    colour map, axis titles from the provenance, and the reference points marked on both
    panels (θ0 on the surface at its height).

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        log: plot ``log10`` of the metric.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ConfigurationError: unknown metric, not 1-D/2-D, nothing finite.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ds = _as_dataset(landscape_or_ds)
    values, coords, dims = _field(ds, metric, None, "plot_html")
    if values.ndim not in (1, 2):
        raise ConfigurationError(
            f"plot_html: metric {metric!r} has {values.ndim} dims {tuple(dims)}; "
            "only 1-D and 2-D landscapes have an HTML view."
        )
    z, label = _transform(values, log, metric, "plot_html")
    title = _title(ds, label, values.shape)
    labels = _axis_labels(ds, dims)
    refs = _reference_points(ds, coords)
    if z.ndim == 1:
        fig = go.Figure(go.Scatter(x=coords[0], y=z, mode="lines+markers", name=label))
        for ref in refs:
            fig.add_vline(
                x=ref.at[0], line_dash="dot" if ref.index == 0 else "dash",
                line_color="gray" if ref.index == 0 else _ref_style(ref)["color"],
                annotation_text=ref.label, annotation_position="top",
            )
        fig.update_layout(
            title={"text": title}, xaxis=_plotly_axis(labels[0]), yaxis=_plotly_axis(label),
            width=900, height=520,
        )
        return fig
    lo, hi = _limits(z)
    lv = _level_array(lo, hi, 30)
    ticks = nice_ticks(float(lv[0]), float(lv[-1]))
    scale = _plotly_colorscale()
    fig = make_subplots(
        rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "xy"}]],
        subplot_titles=("surface", "contour"), horizontal_spacing=0.12,
    )
    zt = z.T  # plotly: z[row=y][col=x]
    hover = f"{labels[0]}: %{{x}}<br>{labels[1]}: %{{y}}<br>{label}: %{{z}}<extra></extra>"
    fig.add_trace(
        go.Surface(
            x=coords[0], y=coords[1], z=zt, colorscale=scale, cmin=lv[0], cmax=lv[-1],
            showscale=True, name=label, hovertemplate=hover,
            colorbar={"title": {"text": label}, "tickvals": ticks.tolist(), "x": 1.02, "len": 0.8},
        ),
        1, 1,
    )
    fig.add_trace(
        go.Contour(
            x=coords[0], y=coords[1], z=zt, colorscale=scale, zmin=lv[0], zmax=lv[-1],
            autocontour=False, contours={"start": lv[0], "end": lv[-1], "size": float(lv[1] - lv[0])},
            showscale=False, name=label, hovertemplate=hover, line={"width": 0.5},
        ),
        1, 2,
    )
    for ref in refs:
        style = _ref_style(ref)
        symbol = _PLOTLY_SYMBOLS[style["marker"]]
        marker = {"symbol": symbol, "size": 14 if ref.index == 0 else 10, "color": style["color"],
                  "line": {"color": "black", "width": 1}}
        fig.add_trace(
            go.Scatter(
                x=[ref.at[0]], y=[ref.at[1]], mode="markers+text", name=ref.label, legendgroup=ref.label,
                text=[ref.label], textposition="top right", marker=marker,
            ),
            1, 2,
        )
        height = _value_at(coords, z, ref.at)
        if math.isfinite(height):
            sym3d = {"star": "diamond", "circle": "circle"}.get(symbol, "square")  # scatter3d has no star
            fig.add_trace(
                go.Scatter3d(
                    x=[ref.at[0]], y=[ref.at[1]], z=[height], mode="markers+text", name=ref.label,
                    legendgroup=ref.label, showlegend=False, text=[ref.label],
                    marker={"symbol": sym3d, "size": 6, "color": style["color"],
                            "line": {"color": "black", "width": 2}},
                ),
                1, 1,
            )
    xspan = float(np.ptp(coords[0])) or 1.0
    yspan = float(np.ptp(coords[1])) or 1.0
    fig.update_layout(
        title={"text": title},
        scene={"xaxis_title": labels[0], "yaxis_title": labels[1], "zaxis_title": label,
               "aspectmode": "cube"},
        xaxis=_plotly_axis(labels[0]),
        yaxis=_plotly_axis(labels[1]) | {"scaleanchor": "x", "scaleratio": xspan / yspan},
        legend={"orientation": "h", "x": 0.0, "y": -0.12},
        width=1150, height=600,
    )
    return fig


def plot_html(
    landscape_or_ds: Any,
    metric: str = "loss",
    *,
    path: str | os.PathLike,
    log: bool = False,
    include_plotlyjs: bool | str = "directory",
) -> Path:
    """Interactive plotly page (`html_figure`): surface + contour for 2-D, a line for 1-D.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        path: HTML file to write (parent directories are created).
        log: plot ``log10`` of the metric.
        include_plotlyjs: ``"directory"`` (default) writes one ``plotly.min.js`` beside the
            file, shared by every page of the folder (pages of a 21×21 landscape are ~50 KB);
            ``True`` embeds plotly.js in the page (~5 MB). Both work offline.

    Returns:
        The written path.

    Raises:
        ConfigurationError: unknown metric, not 1-D/2-D, nothing finite, or ``"cdn"``.
    """
    _check_plotlyjs(include_plotlyjs)
    return _write_html(html_figure(landscape_or_ds, metric, log=log), path, include_plotlyjs)


# --------------------------------------------------------------------------- batch rendering
def _plot_metrics(ds: xarray.Dataset, metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return [str(n) for n, v in ds.data_vars.items() if v.ndim in (1, 2)]
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        if m not in ds.data_vars:
            raise ConfigurationError(
                f"render_all: metric {m!r} is not in the dataset; choose from "
                f"{sorted(map(str, ds.data_vars))}."
            )
    return metrics


def render_all(
    landscape_or_ds: Any,
    out_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    log: bool = False,
    html: bool = True,
    include_plotlyjs: bool | str = "directory",
) -> list[Path]:
    """Write every applicable plot of a landscape into ``out_dir``.

    2-D metrics give ``<m>_contour.png``, ``<m>_contour_filled.png``, ``<m>_surface.png`` and
    ``<m>.html``; 1-D metrics give ``<m>_curve.png`` and ``<m>.html``, plus ``curves.png``
    with all of them when there are several. With ``log=True`` names end in ``_log``. Metrics
    with another number of dims (3-D grids) are skipped. HTML pages share one
    ``plotly.min.js`` in ``out_dir`` (not in the returned list), unless ``include_plotlyjs=True``.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        out_dir: directory to write into (created).
        metrics: metrics to plot; default every 1-D or 2-D data variable.
        log: plot ``log10`` values / log scale.
        html: also write the interactive ``<m>.html`` (plotly).
        include_plotlyjs: as in `plot_html`: ``"directory"`` (one ``plotly.min.js`` beside the
            pages) or ``True`` (embedded in each page, ~5 MB: one file that opens anywhere,
            also where a sibling file cannot be loaded, e.g. MLflow's artifact viewer).

    Returns:
        Written paths in order.
    """
    ds = _as_dataset(landscape_or_ds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sfx = "_log" if log else ""
    paths: list[Path] = []
    curves = []
    for m in _plot_metrics(ds, metrics):
        ndim = ds[m].ndim
        name = _safe_name(m)
        if ndim == 2:
            paths.append(_save_png(plot_contour(ds, m, log=log), out / f"{name}_contour{sfx}.png"))
            paths.append(
                _save_png(
                    plot_contour(ds, m, filled=True, log=log),
                    out / f"{name}_contour_filled{sfx}.png",
                )
            )
            paths.append(_save_png(plot_surface(ds, m, log=log), out / f"{name}_surface{sfx}.png"))
        elif ndim == 1:
            curves.append(m)
            paths.append(_save_png(plot_curve(ds, (m,), log=log), out / f"{name}_curve{sfx}.png"))
        else:
            continue
        if html:
            paths.append(plot_html(ds, m, path=out / f"{name}{sfx}.html", log=log, include_plotlyjs=include_plotlyjs))
    if len(curves) > 1:
        paths.append(_save_png(plot_curve(ds, curves, log=log), out / f"curves{sfx}.png"))
    return paths


# --------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class _Panel:
    """One landscape of a comparison: transformed values, coordinates, labels."""

    z: np.ndarray
    coords: list[np.ndarray]
    dims: list[str]
    zlabel: str
    ds: Any  # xarray.Dataset
    label: str


def _grids_match(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.allclose(x, y, rtol=1e-12, atol=0.0)
        for x, y in zip(a, b, strict=True)
    )


def _comparison_fields(
    datasets: Sequence[Any], labels: Sequence[str], metric: str, log: bool, where: str
) -> list[_Panel]:
    datasets = list(datasets)
    labels = [str(x) for x in labels]
    if not datasets or len(datasets) != len(labels):
        raise ConfigurationError(
            f"{where}: got {len(datasets)} datasets and {len(labels)} labels; pass at least one "
            "dataset and one label per dataset."
        )
    panels = []
    for ds_like, label in zip(datasets, labels, strict=True):
        ds = _as_dataset(ds_like)
        values, coords, dims = _field(ds, metric, None, where)
        z, zlabel = _transform(values, log, metric, f"{where} ({label})")
        panels.append(_Panel(z, coords, dims, zlabel, ds, label))
    ndims = {p.z.ndim for p in panels}
    if len(ndims) != 1 or ndims.pop() not in (1, 2):
        raise ConfigurationError(
            f"{where}: metric {metric!r} has dims {[tuple(p.dims) for p in panels]}; compare "
            "landscapes that are all 1-D or all 2-D."
        )
    return panels


def _plane_note(groups: list[list[int]], ndim: int) -> str | None:
    if ndim != 2 or len(groups) < 2:
        return None
    return (
        f"{len(groups)} different planes (other directions or θ0): side by side only; "
        "difference maps need one shared plane."
    )


def _panel_titles(panels: list[_Panel], groups: list[list[int]]) -> list[str]:
    if len(groups) < 2:
        return [p.label for p in panels]
    plane_of = {i: g for g, members in enumerate(groups, start=1) for i in members}
    return [f"{p.label} · plane {plane_of[i]}" for i, p in enumerate(panels)]


def _grid_shape(n: int) -> tuple[int, int]:
    cols = n if n <= 3 else math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _panel_axes(fig: Figure, panels: list[_Panel]) -> list[Axes]:
    """Square panels in a grid. When every panel's axes mean the same (one set of axis
    labels), the axes are shared, tick labels sit on the outer panels and one x and one y
    title serve the grid; otherwise each panel keeps its own axes and titles."""
    n = len(panels)
    rows, cols = _grid_shape(n)
    labels = [tuple(_axis_labels(p.ds, p.dims)) for p in panels]
    shared = len(set(labels)) == 1
    grid = fig.subplots(rows, cols, sharex=shared, sharey=shared, squeeze=False).ravel()
    for ax in grid[n:]:
        fig.delaxes(ax)
    axes = list(grid[:n])
    for i, (ax, (xl, yl)) in enumerate(zip(axes, labels, strict=True)):
        ax.set_box_aspect(1)
        if shared:
            ax.tick_params(labelbottom=i + cols >= n, labelleft=i % cols == 0)
        else:
            ax.set_xlabel(xl, fontsize="small")
            ax.set_ylabel(yl, fontsize="small")
    if shared:
        fig.supxlabel(labels[0][0], fontsize="medium")
        fig.supylabel(labels[0][1], fontsize="medium")
    return axes


def _grid_legend(fig: Figure, handles: list[Any]) -> None:
    """A grid's legend: right of its colour bar, clear of the panels and the shared x title."""
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def _unique_handles(handles: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for h in handles:
        seen.setdefault(h.get_label(), h)
    return list(seen.values())


def _shared_grid_text(panels: list[_Panel]) -> str:
    shapes = {p.z.shape for p in panels}
    if len(shapes) == 1:
        return _grid_text(next(iter(shapes)), plural=len(panels) > 1)
    return "lines" if panels[0].z.ndim == 1 else "planes"


def comparison_figure(
    datasets: Sequence[Any],
    labels: Sequence[str],
    metric: str = "loss",
    *,
    log: bool = False,
    levels: int = 30,
    planes: Sequence[str | None] | None = None,
) -> Figure:
    """Filled contours in a grid of square panels, one colour scale, shared axes (2-D).

    All panels' contour sets share one ``matplotlib.colors.Normalize`` whose ``vmin``/``vmax``
    are the global finite min/max (of ``log10`` values when ``log``); each panel marks its
    reference points. Landscapes on different planes (`plane_groups`) are labelled
    "plane 1", "plane 2", … and the figure says that differences need one shared plane.
    1-D inputs give overlaid curves.

    Args:
        datasets: landscapes (``xarray.Dataset`` or objects with ``to_xarray()``).
        labels: one panel title per dataset.
        metric: data variable to compare.
        log: compare ``log10`` values.
        levels: number of shared contour levels.
        planes: one plane id per dataset (None: `plane_id`).

    Returns:
        The figure.

    Raises:
        ConfigurationError: mismatched counts, unknown metric, mixed or unsupported dims.
    """
    panels = _comparison_fields(datasets, labels, metric, log, "comparison_figure")
    groups = plane_groups([p.ds for p in panels], planes)
    return _comparison_from_fields(panels, groups, levels)


def _comparison_from_fields(panels: list[_Panel], groups: list[list[int]], levels: int = 30) -> Figure:
    from matplotlib.colors import Normalize

    zlabel = panels[0].zlabel
    title = f"{zlabel} · {_shared_grid_text(panels)}"
    if panels[0].z.ndim == 1:
        fig = _new_figure((6.5, 4.5))
        ax = fig.add_subplot()
        handles = []
        for n, p in enumerate(panels):
            handles += ax.plot(p.coords[0], p.z, color=f"C{n}", marker=".", label=p.label)
        refs = {}
        for p in panels:
            for ref in _reference_points(p.ds, p.coords, named_origin=False):
                refs.setdefault(ref.label, ref)
        handles += _mark_1d(ax, list(refs.values()), top_axis=len({r.at for r in refs.values()}) == len(refs))
        xlabels = {_axis_labels(p.ds, p.dims)[0] for p in panels}
        ax.set_xlabel(xlabels.pop() if len(xlabels) == 1 else "position along each line")
        ax.set_ylabel(zlabel)
        _legend(fig, ax, handles, own=True)
        ax.set_title(title, fontsize="medium")
        return fig
    lo = min(float(np.nanmin(p.z)) for p in panels)
    hi = max(float(np.nanmax(p.z)) for p in panels)
    norm = Normalize(vmin=lo, vmax=hi)
    lv = _level_array(lo, hi, levels)
    rows, cols = _grid_shape(len(panels))
    note = _plane_note(groups, 2)
    fig = _new_figure((3.4 * cols + 2.4, 3.4 * rows + 1.2 + (0.3 if note else 0.0)))
    axes = _panel_axes(fig, panels)
    cs = None
    handles: list[Any] = []
    for ax, p, panel_title in zip(axes, panels, _panel_titles(panels, groups), strict=True):
        cs = ax.contourf(
            p.coords[0], p.coords[1], np.ma.masked_invalid(p.z.T), levels=lv, cmap=_CMAP, norm=norm
        )
        ax.set_title(panel_title, fontsize="medium")
        handles += _mark_2d(ax, _reference_points(p.ds, p.coords, named_origin=False))
    _colorbar(fig, cs, axes, zlabel, float(lv[0]), float(lv[-1]), shrink=0.9)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize="medium")
    _grid_legend(fig, _unique_handles(handles))
    return fig


def _differences(panels: list[_Panel], groups: list[list[int]]) -> list[tuple[np.ndarray, _Panel, str]]:
    """Per plane: each later landscape on the first one's grid minus the first one."""
    out = []
    for members in groups:
        base = panels[members[0]]
        for i in members[1:]:
            p = panels[i]
            if _grids_match(p.coords, base.coords):
                out.append((p.z - base.z, base, f"{p.label} − {base.label}"))
    return out


def _difference_figure(panels: list[_Panel], groups: list[list[int]], levels: int = 30) -> Figure | None:
    from matplotlib.colors import Normalize

    diffs = _differences(panels, groups)
    if not diffs:
        return None
    finite = [np.nanmax(np.abs(d)) for d, _, _ in diffs if np.isfinite(d).any()]
    lim = max(finite, default=0.0) or 1.0
    norm = Normalize(vmin=-lim, vmax=lim)
    lv = _level_array(-lim, lim, levels)
    rows, cols = _grid_shape(len(diffs))
    fig = _new_figure((3.4 * cols + 2.4, 3.4 * rows + 1.2))
    axes = _panel_axes(fig, [base for _, base, _ in diffs])
    cs = None
    handles: list[Any] = []
    for ax, (d, base, label) in zip(axes, diffs, strict=True):
        cs = ax.contourf(
            base.coords[0], base.coords[1], np.ma.masked_invalid(d.T), levels=lv, cmap=_DIFF_CMAP, norm=norm
        )
        ax.set_title(label, fontsize="medium")
        handles += _mark_2d(ax, _reference_points(base.ds, base.coords, named_origin=False))
    zlabel = panels[0].zlabel
    _colorbar(fig, cs, axes, f"Δ {zlabel}", float(lv[0]), float(lv[-1]), shrink=0.9)
    fig.suptitle(f"Δ {zlabel} · same plane, same grid", fontsize="medium")
    _grid_legend(fig, _unique_handles(handles))
    return fig


def _comparison_html(panels: list[_Panel], groups: list[list[int]], lo: float, hi: float) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    zlabel = panels[0].zlabel
    note = _plane_note(groups, panels[0].z.ndim)
    title = f"{zlabel} · {_shared_grid_text(panels)}" + (f"<br><sub>{note}</sub>" if note else "")
    if panels[0].z.ndim == 1:
        fig = go.Figure(
            [go.Scatter(x=p.coords[0], y=p.z, mode="lines+markers", name=p.label) for p in panels]
        )
        xlabels = {_axis_labels(p.ds, p.dims)[0] for p in panels}
        fig.update_layout(
            title={"text": title}, yaxis=_plotly_axis(zlabel),
            xaxis=_plotly_axis(xlabels.pop() if len(xlabels) == 1 else "position along each line"),
            width=900, height=520,
        )
        fig.add_vline(x=0.0, line_dash="dot", line_color="gray", annotation_text="θ0")
        return fig
    rows, cols = _grid_shape(len(panels))
    lv = _level_array(lo, hi, 30)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=_panel_titles(panels, groups), shared_xaxes="all",
        shared_yaxes="all", horizontal_spacing=0.05, vertical_spacing=0.12 / rows,
    )
    scale = _plotly_colorscale()
    labels = [tuple(_axis_labels(p.ds, p.dims)) for p in panels]
    common = len(set(labels)) == 1
    shown: set[str] = set()
    for n, p in enumerate(panels):
        row, col = divmod(n, cols)
        fig.add_trace(
            go.Contour(
                x=p.coords[0], y=p.coords[1], z=p.z.T, colorscale=scale, zmin=lv[0], zmax=lv[-1],
                autocontour=False, contours={"start": lv[0], "end": lv[-1], "size": float(lv[1] - lv[0])},
                showscale=n == 0, name=p.label, line={"width": 0.5},
                colorbar={"title": {"text": zlabel}, "tickvals": nice_ticks(float(lv[0]), float(lv[-1])).tolist()},
            ),
            row + 1, col + 1,
        )
        for ref in _reference_points(p.ds, p.coords, named_origin=False):
            style = _ref_style(ref)
            symbol = _PLOTLY_SYMBOLS[style["marker"]]
            fig.add_trace(
                go.Scatter(
                    x=[ref.at[0]], y=[ref.at[1]], mode="markers", name=ref.label, legendgroup=ref.label,
                    showlegend=ref.label not in shown,
                    marker={"symbol": symbol, "size": 12 if ref.index == 0 else 9, "color": style["color"],
                            "line": {"color": "black", "width": 1}},
                ),
                row + 1, col + 1,
            )
            shown.add(ref.label)
        bottom, left = n + cols >= len(panels), col == 0
        if bottom or not common:
            fig.update_xaxes(title_text=labels[n][0], row=row + 1, col=col + 1, showticklabels=True)
        if left or not common:
            fig.update_yaxes(title_text=labels[n][1], row=row + 1, col=col + 1)
    fig.update_layout(
        title={"text": title}, width=340 * cols + 260, height=340 * rows + 220,
        legend={"orientation": "h", "x": 0.0, "y": -0.08 - 0.1 / rows},
    )
    return fig


def plot_comparison(
    datasets: Sequence[Any],
    labels: Sequence[str],
    metric: str = "loss",
    *,
    out_dir: str | os.PathLike,
    log: bool = False,
    planes: Sequence[str | None] | None = None,
    include_plotlyjs: bool | str = "directory",
) -> list[Path]:
    """Compare landscapes: shared-scale panels, difference maps, and an HTML view.

    Writes ``<m>_comparison.png`` (2-D: a grid of square panels, one colour scale, shared
    axes; 1-D: overlaid curves), ``<m>_difference.png`` (2-D: for each plane, the landscapes
    whose grid equals its first one's, minus that one; only when some plane holds two) and
    ``<m>_comparison.html``. Landscapes on different planes are only shown side by side: their
    values at equal coordinates belong to different points of parameter space. The shared
    scale is stored in the PNG text chunk ``landscapes:color_scale`` as JSON
    ``{"vmin", "vmax", "log", "metric", "planes"}``. Nothing is written when the inputs are bad.

    Args:
        datasets: landscapes (``xarray.Dataset`` or objects with ``to_xarray()``).
        labels: one label per dataset.
        metric: data variable to compare.
        out_dir: directory to write into (created).
        log: compare ``log10`` values.
        planes: one plane id per dataset (e.g. the MLflow tag ``landscapes.directions``);
            None entries, or no list, take `plane_id` of the dataset.
        include_plotlyjs: ``"directory"`` (one ``plotly.min.js`` beside the page) or ``True``.

    Returns:
        Written paths: PNGs first, then the HTML.

    Raises:
        ConfigurationError: mismatched counts, unknown metric, mixed or unsupported dims.
    """
    _check_plotlyjs(include_plotlyjs)
    panels = _comparison_fields(datasets, labels, metric, log, "plot_comparison")
    groups = plane_groups([p.ds for p in panels], planes)
    out = Path(out_dir)
    name = _safe_name(metric) + ("_log" if log else "")
    lo = min(float(np.nanmin(p.z)) for p in panels)
    hi = max(float(np.nanmax(p.z)) for p in panels)
    scale = {"vmin": lo, "vmax": hi, "log": log, "metric": metric, "planes": len(groups)}
    meta = {COLOR_SCALE_KEY: json.dumps(scale)}
    out.mkdir(parents=True, exist_ok=True)
    paths = [_save_png(_comparison_from_fields(panels, groups), out / f"{name}_comparison.png", meta)]
    if panels[0].z.ndim == 2:
        diff = _difference_figure(panels, groups)
        if diff is not None:
            paths.append(_save_png(diff, out / f"{name}_difference.png"))
    html = _comparison_html(panels, groups, lo, hi)
    paths.append(_write_html(html, out / f"{name}_comparison.html", include_plotlyjs))
    return paths
