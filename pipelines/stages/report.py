"""Stage 5: render the plots (PNG and interactive HTML) of one landscape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landscapes import export, plots
from landscapes.store import LandscapeStore
from pipelines.config import PipelineConfig, PlotlyJs


@dataclass(frozen=True)
class ReportInputs:
    store: Path
    out_dir: Path


@dataclass(frozen=True)
class ReportOutputs:
    plots: tuple[Path, ...]
    artifacts: tuple[Path, ...]


def report(cfg: PipelineConfig, inputs: ReportInputs) -> ReportOutputs:
    """Contour, filled contour and 3-D surface for planes; curves for lines; HTML if enabled.

    Plots the metrics of ``plot.metrics`` and every custom metric of ``metrics.extra``. Axis
    names, titles and reference points come from the store's provenance attrs (``directions``,
    ``checkpoint``). With ``plot.plotlyjs=embed`` (default) each HTML page embeds plotly.js
    (~5 MB): MLflow's artifact viewer shows a page from a ``blob:`` URL in a sandboxed iframe,
    where a ``plotly.min.js`` beside it cannot be loaded, so only a self-contained page renders
    there. ``plot.plotlyjs=directory`` writes one shared ``plotly.min.js`` instead (small pages
    that open from the folder, not in MLflow's viewer).
    """
    pcfg = cfg.plot
    ds = LandscapeStore.open(inputs.store, mode="r").to_xarray()
    wanted = [m for m in dict.fromkeys([*pcfg.metrics, *cfg.metrics.extra]) if m in ds.data_vars]  # custom metrics too
    out_dir = inputs.out_dir / "plots"
    paths: list[Path] = []
    for metric in wanted:  # log scale for the loss only: accuracy lives in [0, 1]
        paths += plots.render_all(ds, out_dir, metrics=[metric], log=pcfg.log and metric == "loss", html=pcfg.html,
                                  include_plotlyjs=PlotlyJs(pcfg.plotlyjs).include)
    paths += _trajectory_plots(ds, [m for m in wanted if ds[m].ndim == 2], out_dir, log=pcfg.log)
    exports = _exports(ds, inputs.out_dir / "exports", log=pcfg.log) if pcfg.exports else ()
    return ReportOutputs(plots=tuple(paths), artifacts=(out_dir, *exports))


def _exports(ds: Any, out_dir: Path, *, log: bool) -> tuple[Path, ...]:
    """The landscape for other tools: ``landscape.nc`` (NetCDF) and, for a plane, ``landscape.vts``
    (VTK structured grid, the loss as height, log10 with ``plot.log``)."""
    export.to_netcdf(ds, out_dir / "landscape.nc")
    if "loss" in ds.data_vars and ds["loss"].ndim == 2:
        finite = ds["loss"].values[np.isfinite(ds["loss"].values)]
        export.to_vtk(ds, out_dir / "landscape.vts", metric="loss", log=log and bool((finite > 0).any()))
    return (out_dir,)  # the folder is the artifact


def _trajectory_plots(ds: Any, metrics: list[str], out_dir: Path, *, log: bool) -> list[Path]:
    """``<m>_trajectory.png``: the training run drawn on the plane, when the store records one
    (``directions.trajectory``, from ``directions.kind=pca``), else this run's checkpoint on a
    shared plane (``subject``, from ``directions.origin``)."""
    record = (ds.attrs.get("directions") or {}).get("trajectory") or ds.attrs.get("subject")
    if not record or not metrics:
        return []
    out = []
    for metric in metrics:
        fig = plots.plot_trajectory(ds, record["coords"], record["labels"], metric, log=log and metric == "loss",
                                    explained=record.get("plane_explained"))
        path = out_dir / f"{metric}_trajectory{'_log' if log and metric == 'loss' else ''}.png"
        fig.savefig(path, dpi=plots.DPI)
        out.append(path)
    return out
