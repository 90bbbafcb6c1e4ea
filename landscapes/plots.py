"""Plots of landscapes: contour, filled contour, 3-D surface, 1-D curves (PNG) and plotly HTML.

Every function takes an ``xarray.Dataset`` (e.g. ``LandscapeStore.to_xarray()``) or any object
with a ``to_xarray()`` method (``Landscape``, ``LandscapeStore``). Metric values ``v[i, j]``
sit at ``(coords[dims[0]][i], coords[dims[1]][j])`` (``ij`` order).

matplotlib figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so
nothing here changes the user's backend or leaves figures open; PNGs are rendered by Agg.
Heavy imports (matplotlib, plotly, xarray) happen inside the functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscapes.errors import ConfigurationError

if TYPE_CHECKING:
    import xarray
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "comparison_figure",
    "plot_comparison",
    "plot_contour",
    "plot_curve",
    "plot_html",
    "plot_surface",
    "render_all",
]

DPI = 100
"""Resolution of written PNGs; a figure of ``figsize=(w, h)`` becomes ``w*DPI × h*DPI`` pixels."""

COLOR_SCALE_KEY = "landscapes:color_scale"
"""PNG text chunk of comparison plots: JSON with the shared ``vmin``/``vmax``."""

_CMAP = "viridis"
_DIFF_CMAP = "RdBu_r"


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


def _transform(values: np.ndarray, log: bool, metric: str, where: str) -> tuple[np.ndarray, str]:
    """Apply ``log10`` (non-positive → NaN) when asked; refuse an all-NaN field."""
    label = metric
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
        label = f"log10 {metric}"
    if not np.isfinite(values).any():
        fix = "pass log=False or evaluate some tiles" if log else "evaluate some tiles first"
        raise ConfigurationError(
            f"{where}: metric {metric!r} has no {'positive' if log else 'finite'} values, so "
            f"there is nothing to plot; {fix}."
        )
    return values, label


def _axis_label(ds: xarray.Dataset, dim: str) -> str:
    if dim in ds.coords:
        attrs = ds[dim].attrs
        return str(attrs.get("long_name") or attrs.get("description") or dim)
    return dim


def _contains_zero(coords: np.ndarray) -> bool:
    return bool(coords.min() <= 0.0 <= coords.max())


def _limits(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    return lo, hi


def _level_array(lo: float, hi: float, levels: int | Sequence[float]) -> np.ndarray:
    if not isinstance(levels, (int, np.integer)):
        return np.asarray(levels, dtype=np.float64)
    if int(levels) < 2:
        raise ConfigurationError(f"levels={levels}: give at least 2 contour levels.")
    from matplotlib.ticker import MaxNLocator

    if hi <= lo:  # constant field: a band around the value
        pad = abs(lo) * 1e-3 or 1e-3
        lo, hi = lo - pad, hi + pad
    return MaxNLocator(nbins=int(levels)).tick_values(lo, hi)  # round values covering [lo, hi]


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


def _mark_theta0_2d(ax: Axes, coords: Sequence[np.ndarray]) -> None:
    if _contains_zero(coords[0]) and _contains_zero(coords[1]):
        ax.plot(
            [0.0],
            [0.0],
            linestyle="none",
            marker="*",
            markersize=12,
            color="white",
            markeredgecolor="black",
            label="θ0",
            zorder=5,
        )
        ax.legend(loc="upper right", fontsize="small")


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
    """Contour (or filled contour) of a 2-D landscape, with θ0 marked when inside the grid.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        filled: filled contours (``contourf``) instead of lines.
        levels: number of evenly spaced levels, or explicit level values.
        log: plot ``log10`` of the metric (non-positive values left blank).
        ax: draw into this axes instead of a new figure.
        title: axes title; default the metric name.

    Returns:
        The figure holding the plot.

    Raises:
        ConfigurationError: unknown metric, not 2-D, or nothing finite to plot.
    """
    ds = _as_dataset(landscape_or_ds)
    values, coords, dims = _field(ds, metric, 2, "plot_contour")
    z, label = _transform(values, log, metric, "plot_contour")
    lo, hi = _limits(z)
    if ax is None:
        fig = _new_figure((6.0, 5.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    zm = np.ma.masked_invalid(z.T)  # matplotlib wants z[row=y, col=x]
    lv = _level_array(lo, hi, levels)
    draw = ax.contourf if filled else ax.contour
    cs = draw(coords[0], coords[1], zm, levels=lv, cmap=_CMAP)
    fig.colorbar(cs, ax=ax, label=label)
    ax.set_xlabel(_axis_label(ds, dims[0]))
    ax.set_ylabel(_axis_label(ds, dims[1]))
    ax.set_title(title if title is not None else label)
    _mark_theta0_2d(ax, coords)
    return fig


def plot_surface(landscape_or_ds: Any, metric: str = "loss", *, log: bool = False) -> Figure:
    """3-D surface of a 2-D landscape.

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
    ax = fig.add_subplot(projection="3d")
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
    )
    fig.colorbar(surf, ax=ax, label=label, shrink=0.7)
    ax.set_xlabel(_axis_label(ds, dims[0]))
    ax.set_ylabel(_axis_label(ds, dims[1]))
    ax.set_title(label)
    i0 = np.flatnonzero(coords[0] == 0.0)
    j0 = np.flatnonzero(coords[1] == 0.0)
    if i0.size and j0.size and np.isfinite(z[i0[0], j0[0]]):
        ax.scatter([0.0], [0.0], [z[i0[0], j0[0]]], color="red", marker="*", s=80, label="θ0")
        ax.legend(loc="upper right", fontsize="small")
    return fig


def _is_accuracy(name: str) -> bool:
    return "acc" in name.lower()


def plot_curve(
    landscape_or_ds: Any, metrics: Sequence[str] | str = ("loss",), *, log: bool = False
) -> Figure:
    """Curves of a 1-D landscape; accuracy-like metrics go on a twin y-axis beside the others.

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
    ax.set_ylabel(", ".join(left))
    if log:
        ax.set_yscale("log")
    if right:
        ax2 = ax.twinx()
        for n, m in enumerate(right, start=len(left)):
            values, x, _ = fields[m]
            handles += ax2.plot(x, values, color=f"C{n}", marker=".", linestyle="--", label=m)
        ax2.set_ylabel(", ".join(right))
    dim = fields[metrics[0]][2]
    x0 = fields[metrics[0]][1]
    ax.set_xlabel(_axis_label(ds, dim))
    if _contains_zero(x0):
        handles.append(ax.axvline(0.0, color="gray", linestyle=":", linewidth=1, label="θ0"))
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_title(", ".join(metrics))
    return fig


# --------------------------------------------------------------------------- plotly HTML
def plot_html(
    landscape_or_ds: Any,
    metric: str = "loss",
    *,
    path: str | os.PathLike,
    log: bool = False,
    include_plotlyjs: bool | str = True,
) -> Path:
    """Interactive plotly page: surface + contour for 2-D, a line for 1-D.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        metric: data variable to plot.
        path: HTML file to write (parent directories are created).
        log: plot ``log10`` of the metric.
        include_plotlyjs: ``True`` embeds plotly.js (self-contained, works offline, ~5 MB);
            ``"directory"`` writes one ``plotly.min.js`` beside the file instead.

    Returns:
        The written path.

    Raises:
        ConfigurationError: unknown metric, not 1-D/2-D, nothing finite, or ``"cdn"``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if include_plotlyjs not in (True, "directory"):
        raise ConfigurationError(
            f"include_plotlyjs={include_plotlyjs!r} needs network access to view; use True "
            "(embedded) or 'directory' so the page works offline."
        )
    ds = _as_dataset(landscape_or_ds)
    values, coords, dims = _field(ds, metric, None, "plot_html")
    if values.ndim not in (1, 2):
        raise ConfigurationError(
            f"plot_html: metric {metric!r} has {values.ndim} dims {tuple(dims)}; "
            "only 1-D and 2-D landscapes have an HTML view."
        )
    z, label = _transform(values, log, metric, "plot_html")
    if z.ndim == 1:
        fig = go.Figure(go.Scatter(x=coords[0], y=z, mode="lines+markers", name=label))
        fig.update_layout(xaxis_title=_axis_label(ds, dims[0]), yaxis_title=label, title=label)
    else:
        fig = make_subplots(
            rows=1,
            cols=2,
            specs=[[{"type": "surface"}, {"type": "xy"}]],
            subplot_titles=("surface", "contour"),
        )
        zt = z.T  # plotly: z[row=y][col=x]
        fig.add_trace(go.Surface(x=coords[0], y=coords[1], z=zt, coloraxis="coloraxis"), 1, 1)
        fig.add_trace(
            go.Contour(x=coords[0], y=coords[1], z=zt, coloraxis="coloraxis", ncontours=30),
            1,
            2,
        )
        if _contains_zero(coords[0]) and _contains_zero(coords[1]):
            fig.add_trace(
                go.Scatter(
                    x=[0.0],
                    y=[0.0],
                    mode="markers",
                    name="θ0",
                    marker={
                        "symbol": "star",
                        "size": 12,
                        "color": "white",
                        "line": {"color": "black", "width": 1},
                    },
                ),
                1,
                2,
            )
        xl, yl = _axis_label(ds, dims[0]), _axis_label(ds, dims[1])
        fig.update_layout(
            title=label,
            coloraxis={"colorscale": "Viridis", "colorbar": {"title": label}},
            scene={"xaxis_title": xl, "yaxis_title": yl, "zaxis_title": label},
            xaxis_title=xl,
            yaxis_title=yl,
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(out, include_plotlyjs=include_plotlyjs, full_html=True)
    return out


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
) -> list[Path]:
    """Write every applicable plot of a landscape into ``out_dir``.

    2-D metrics give ``<m>_contour.png``, ``<m>_contour_filled.png``, ``<m>_surface.png`` and
    ``<m>.html``; 1-D metrics give ``<m>_curve.png`` and ``<m>.html``, plus ``curves.png``
    with all of them when there are several. With ``log=True`` names end in ``_log``. Metrics
    with another number of dims (3-D grids) are skipped.

    Args:
        landscape_or_ds: ``xarray.Dataset`` or object with ``to_xarray()``.
        out_dir: directory to write into (created).
        metrics: metrics to plot; default every 1-D or 2-D data variable.
        log: plot ``log10`` values / log scale.
        html: also write the interactive ``<m>.html`` (plotly).

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
            paths.append(plot_html(ds, m, path=out / f"{name}{sfx}.html", log=log))
    if len(curves) > 1:
        paths.append(_save_png(plot_curve(ds, curves, log=log), out / f"curves{sfx}.png"))
    return paths


# --------------------------------------------------------------------------- comparisons
def _grids_match(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.allclose(x, y, rtol=1e-12, atol=0.0)
        for x, y in zip(a, b, strict=True)
    )


def _comparison_fields(
    datasets: Sequence[Any], labels: Sequence[str], metric: str, log: bool, where: str
) -> list[tuple[np.ndarray, list[np.ndarray], list[str], str]]:
    datasets = list(datasets)
    labels = [str(x) for x in labels]
    if not datasets or len(datasets) != len(labels):
        raise ConfigurationError(
            f"{where}: got {len(datasets)} datasets and {len(labels)} labels; pass at least one "
            "dataset and one label per dataset."
        )
    fields = []
    for ds_like, label in zip(datasets, labels, strict=True):
        ds = _as_dataset(ds_like)
        values, coords, dims = _field(ds, metric, None, where)
        z, zlabel = _transform(values, log, metric, f"{where} ({label})")
        fields.append((z, coords, dims, zlabel))
    ndims = {f[0].ndim for f in fields}
    if len(ndims) != 1 or ndims.pop() not in (1, 2):
        raise ConfigurationError(
            f"{where}: metric {metric!r} has dims {[tuple(f[2]) for f in fields]}; compare "
            "landscapes that are all 1-D or all 2-D."
        )
    return fields


def comparison_figure(
    datasets: Sequence[Any],
    labels: Sequence[str],
    metric: str = "loss",
    *,
    log: bool = False,
    levels: int = 30,
) -> Figure:
    """Side-by-side filled contours with one shared colour scale and shared axes (2-D).

    All panels' contour sets share one ``matplotlib.colors.Normalize`` whose ``vmin``/``vmax``
    are the global finite min/max (of ``log10`` values when ``log``); 1-D inputs give
    overlaid curves.

    Args:
        datasets: landscapes (``xarray.Dataset`` or objects with ``to_xarray()``).
        labels: one panel title per dataset.
        metric: data variable to compare.
        log: compare ``log10`` values.
        levels: number of shared contour levels.

    Returns:
        The figure.

    Raises:
        ConfigurationError: mismatched counts, unknown metric, mixed or unsupported dims.
    """
    fields = _comparison_fields(datasets, labels, metric, log, "comparison_figure")
    return _comparison_from_fields(fields, [str(x) for x in labels], levels)


def _comparison_from_fields(fields, labels: list[str], levels: int = 30) -> Figure:
    from matplotlib.colors import Normalize

    zlabel = fields[0][3]
    if fields[0][0].ndim == 1:
        fig = _new_figure((6.5, 4.5))
        ax = fig.add_subplot()
        for n, ((z, coords, _, _), label) in enumerate(zip(fields, labels, strict=True)):
            ax.plot(coords[0], z, color=f"C{n}", marker=".", label=label)
        ax.set_xlabel(fields[0][2][0])
        ax.set_ylabel(zlabel)
        ax.legend(loc="best", fontsize="small")
        ax.set_title(zlabel)
        return fig
    lo = min(float(np.nanmin(f[0])) for f in fields)
    hi = max(float(np.nanmax(f[0])) for f in fields)
    norm = Normalize(vmin=lo, vmax=hi)
    lv = _level_array(lo, hi, levels)
    fig = _new_figure((4.2 * len(fields) + 1.2, 4.2))
    axes = fig.subplots(1, len(fields), sharex=True, sharey=True, squeeze=False)[0]
    cs = None
    for ax, (z, coords, dims, _), label in zip(axes, fields, labels, strict=True):
        cs = ax.contourf(
            coords[0], coords[1], np.ma.masked_invalid(z.T), levels=lv, cmap=_CMAP, norm=norm
        )
        ax.set_title(label)
        ax.set_xlabel(dims[0])
        _mark_theta0_2d(ax, coords)
    axes[0].set_ylabel(fields[0][2][1])
    fig.colorbar(cs, ax=list(axes), label=zlabel)
    return fig


def _difference_figure(fields, labels: list[str], levels: int = 30) -> Figure | None:
    from matplotlib.colors import Normalize

    base_z, base_coords, base_dims, zlabel = fields[0]
    diffs = [
        (f[0] - base_z, label)
        for f, label in zip(fields[1:], labels[1:], strict=True)
        if _grids_match(f[1], base_coords)
    ]
    if not diffs:
        return None
    finite = [np.nanmax(np.abs(d)) for d, _ in diffs if np.isfinite(d).any()]
    lim = max(finite, default=0.0) or 1.0
    norm = Normalize(vmin=-lim, vmax=lim)
    lv = _level_array(-lim, lim, levels)
    fig = _new_figure((4.2 * len(diffs) + 1.2, 4.2))
    axes = fig.subplots(1, len(diffs), sharex=True, sharey=True, squeeze=False)[0]
    cs = None
    for ax, (d, label) in zip(axes, diffs, strict=True):
        cs = ax.contourf(
            base_coords[0],
            base_coords[1],
            np.ma.masked_invalid(d.T),
            levels=lv,
            cmap=_DIFF_CMAP,
            norm=norm,
        )
        ax.set_title(f"{label} − {labels[0]}")
        ax.set_xlabel(base_dims[0])
        _mark_theta0_2d(ax, base_coords)
    axes[0].set_ylabel(base_dims[1])
    fig.colorbar(cs, ax=list(axes), label=f"Δ {zlabel}")
    return fig


def plot_comparison(
    datasets: Sequence[Any],
    labels: Sequence[str],
    metric: str = "loss",
    *,
    out_dir: str | os.PathLike,
    log: bool = False,
) -> list[Path]:
    """Compare landscapes: shared-scale panels, difference maps, and an HTML view.

    Writes ``<m>_comparison.png`` (2-D: one panel per dataset, one colour scale, shared axes;
    1-D: overlaid curves), ``<m>_difference.png`` (2-D, datasets whose grid equals the first
    one's, minus the first) and ``<m>_comparison.html``. The shared scale is stored in the
    PNG text chunk ``landscapes:color_scale`` as JSON ``{"vmin", "vmax", "log", "metric"}``.

    Args:
        datasets: landscapes (``xarray.Dataset`` or objects with ``to_xarray()``).
        labels: one label per dataset.
        metric: data variable to compare.
        out_dir: directory to write into (created).
        log: compare ``log10`` values.

    Returns:
        Written paths: PNGs first, then the HTML.

    Raises:
        ConfigurationError: mismatched counts, unknown metric, mixed or unsupported dims.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fields = _comparison_fields(datasets, labels, metric, log, "plot_comparison")
    labels = [str(x) for x in labels]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _safe_name(metric) + ("_log" if log else "")
    lo = min(float(np.nanmin(f[0])) for f in fields)
    hi = max(float(np.nanmax(f[0])) for f in fields)
    meta = {COLOR_SCALE_KEY: json.dumps({"vmin": lo, "vmax": hi, "log": log, "metric": metric})}
    paths = [
        _save_png(_comparison_from_fields(fields, labels), out / f"{name}_comparison.png", meta)
    ]
    zlabel = fields[0][3]
    if fields[0][0].ndim == 2:
        diff = _difference_figure(fields, labels)
        if diff is not None:
            paths.append(_save_png(diff, out / f"{name}_difference.png"))
        fig = make_subplots(
            rows=1, cols=len(fields), subplot_titles=labels, shared_xaxes=True, shared_yaxes=True
        )
        for n, (z, coords, _, _) in enumerate(fields, start=1):
            fig.add_trace(go.Heatmap(x=coords[0], y=coords[1], z=z.T, coloraxis="coloraxis"), 1, n)
        fig.update_layout(
            coloraxis={
                "colorscale": "Viridis",
                "cmin": lo,
                "cmax": hi,
                "colorbar": {"title": zlabel},
            },
            title=zlabel,
        )
    else:
        fig = go.Figure(
            [
                go.Scatter(x=coords[0], y=z, mode="lines+markers", name=label)
                for (z, coords, _, _), label in zip(fields, labels, strict=True)
            ]
        )
        fig.update_layout(title=zlabel, yaxis_title=zlabel, xaxis_title=fields[0][2][0])
    html = out / f"{name}_comparison.html"
    fig.write_html(html, include_plotlyjs=True, full_html=True)
    paths.append(html)
    return paths
