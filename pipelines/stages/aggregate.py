"""Stage 4: finalize the store and compute the summary figures of the landscape."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landscapes.errors import LandscapesWarning, StoreError
from landscapes.plots import round_coordinate
from landscapes.sharpness import grid_sharpness
from landscapes.store import LandscapeStore
from pipelines.config import PipelineConfig
from pipelines.stages.evaluate import theta0_index


@dataclass(frozen=True)
class AggregateInputs:
    store: Path


@dataclass(frozen=True)
class AggregateOutputs:
    store: Path
    summary: dict[str, Any]
    figures: dict[str, float]  # the landscape's finite summary figures: logged on the pipeline run, not here
    metrics: dict[str, float] = field(default_factory=dict)  # this stage's own measurements
    artifacts: tuple[Path, ...] = ()


def aggregate(cfg: PipelineConfig, inputs: AggregateInputs) -> AggregateOutputs:
    """Summary metrics: values at θ0, the minimum and where, grid sharpness (absolute and relative,
    θ0 excluded; absent when no other point lies within ``summary.radius``), flat area, NaN counts;
    on a shared plane (``directions.origin``) also ``<metric>_at_checkpoint``, the values at the
    run's own checkpoint (θ0 is then the shared origin).

    The figures describe the landscape, so the pipeline run carries them (once, where the runs list
    compares them); this stage's run logs only how long it took.
    """
    started = time.perf_counter()
    store = LandscapeStore.open(inputs.store, mode="r+")
    if not store.is_complete():
        missing = len(store.missing_tiles())
        raise StoreError(
            f"aggregate: {missing} tile(s) of {inputs.store} are not done; re-run the pipeline "
            "(it resumes the evaluation) before aggregating."
        )
    summary = summarize(store, radius=cfg.summary.radius, flat_tolerance=cfg.summary.flat_tolerance)
    store.update_attrs({"summary": {k: (v if _finite(v) else str(v)) for k, v in summary.items()}})
    figures = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and _finite(v)}
    return AggregateOutputs(store=inputs.store, summary=summary, figures=figures,
                            metrics={"aggregate_seconds": time.perf_counter() - started}, artifacts=(inputs.store,))


def summarize(store: LandscapeStore, *, radius: float, flat_tolerance: float) -> dict[str, Any]:
    axes = [np.asarray(a) for a in store.axes]
    centre = theta0_index(axes)
    out: dict[str, Any] = {"points": int(np.prod([a.size for a in axes]))}
    for name in store.metrics:
        values = store.read(name)
        finite = np.isfinite(values)
        out[f"{name}_nan_count"] = int(np.isnan(values).sum())
        out[f"{name}_inf_count"] = int(np.isinf(values).sum())
        if centre is not None:
            out[f"{name}_at_theta0"] = float(values[centre])
        if not finite.any():
            continue
        masked = np.where(finite, values, np.inf)
        imin = np.unravel_index(int(np.argmin(masked)), values.shape)
        out[f"{name}_min"] = float(values[imin])
        out[f"{name}_max"] = float(np.max(np.where(finite, values, -np.inf)))
        for d, i in zip(store.dims, imin, strict=True):
            axis = axes[store.dims.index(d)]
            out[f"{name}_argmin_{d}"] = round_coordinate(float(axis[i]), axis)  # -0.1, not -0.09999999999999998
    for name, value in ((store.attrs.get("subject") or {}).get("values") or {}).items():
        out[f"{name}_at_checkpoint"] = float(value)  # a shared plane: the run's own checkpoint, off the centre
    loss = store.read("loss") if "loss" in store.metrics else None
    if loss is not None and centre is not None and np.isfinite(loss[centre]):
        l0 = float(loss[centre])
        for key, relative in ((f"sharpness_r{radius:g}", False), (f"sharpness_rel_r{radius:g}", True)):
            value = _grid_sharpness(loss, axes, radius=radius, relative=relative)
            if value is not None:
                out[key] = value
        out[f"flat_area_tol{flat_tolerance:g}"] = float(np.mean(np.isfinite(loss) & (loss <= (1 + flat_tolerance) * l0)))
    return out


def _grid_sharpness(loss: np.ndarray, axes: list[np.ndarray], *, radius: float, relative: bool) -> float | None:
    """`landscapes.grid_sharpness` (θ0 excluded), or None when it is not finite: no grid point
    other than θ0 within the radius, or a zero loss at θ0 for the relative form (the library's
    warning says so; here the figure is simply absent, never 0.0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LandscapesWarning)
        value = grid_sharpness(loss, axes, radius=radius, relative=relative)
    return float(value) if math.isfinite(value) else None


def _finite(v: Any) -> bool:
    return not (isinstance(v, float) and not math.isfinite(v))

