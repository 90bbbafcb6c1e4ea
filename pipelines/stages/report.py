"""Stage 5: render the plots (PNG and interactive HTML) of one landscape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from landscapes import plots
from landscapes.store import LandscapeStore
from pipelines.config import PipelineConfig


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
    ``checkpoint``). HTML pages share one ``plotly.min.js`` in ``plots/`` (logged with the
    folder, not listed in ``plots``), so they stay small and open offline.
    """
    pcfg = cfg.plot
    ds = LandscapeStore.open(inputs.store, mode="r").to_xarray()
    wanted = [m for m in dict.fromkeys([*pcfg.metrics, *cfg.metrics.extra]) if m in ds.data_vars]  # custom metrics too
    out_dir = inputs.out_dir / "plots"
    paths: list[Path] = []
    for metric in wanted:  # log scale for the loss only: accuracy lives in [0, 1]
        paths += plots.render_all(ds, out_dir, metrics=[metric], log=pcfg.log and metric == "loss", html=pcfg.html)
    return ReportOutputs(plots=tuple(paths), artifacts=(out_dir,))

