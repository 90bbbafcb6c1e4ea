"""Stage 3: evaluate the grid tile by tile into the landscape's Zarr store (resumable).

The store's path is derived from the stage's fingerprint, so running the same command again
reopens it and computes only the tiles its ``done`` mask lacks (``tiles_reused`` counts the
others); ``resume=<store>`` reopens a store at another path, if it was made for the same
configuration. NaN and inf are ordinary values here: only the ``done`` mask says a tile is
finished.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscapes as L
from landscapes.directions_store import load_directions
from landscapes.errors import ShapeMismatchError, StoreError
from landscapes.grid import Grid, tile_shape_for
from landscapes.integrity import file_lock
from landscapes.store import LandscapeStore, verify_store
from pipelines.backends import Backend, make_backend
from pipelines.builders import (
    as_device,
    build_adapters,
    build_data,
    build_metrics,
    grid_axes,
    load_model,
)
from pipelines.config import PipelineConfig
from pipelines.preflight import check_data_fits, check_memory_budget
from pipelines.stages.pca import subject_on_plane


@dataclass(frozen=True)
class EvaluateInputs:
    checkpoint: Path
    directions: Path
    store: Path  # where the landscape's store lives (reopened to resume)
    fingerprint: str  # what the store must have been created for
    provenance: dict[str, Any] = field(default_factory=dict)
    origin: Path | None = None  # a shared plane's origin (directions.origin); None: the plane goes through θ0


@dataclass(frozen=True)
class EvaluateOutputs:
    store: Path
    strategy: str
    tile_shape: tuple[int, ...]
    points: int
    tiles_computed: int
    tiles_reused: int
    seconds: float
    shape: tuple[int, ...]  # the grid's shape: points per axis
    metrics: dict[str, float] = field(default_factory=dict)
    backend: str = "local"


def evaluate(cfg: PipelineConfig, inputs: EvaluateInputs, backend: Backend | None = None) -> EvaluateOutputs:
    """Evaluate every tile not yet done, writing each to the store as it finishes.

    Args:
        cfg: the typed pipeline config (reads ``model``, ``data``, ``metrics``, ``grid``,
            ``compute``, ``checkpoint`` and ``resume``: a store to continue).
        inputs: checkpoint, directions, where the store lives and its fingerprint.
        backend: who evaluates the tiles; default from ``compute.backend``.

    Returns:
        The store, the counts of computed and reused tiles, timings.

    Raises:
        ConfigurationError: a bad compute option (unreachable scheduler, no GPU, ...).
        StoreError: ``resume`` names no store, or a store made for another configuration.
        EvaluationError: tiles failed; the finished ones are kept and a re-run resumes.
    """
    ccfg = cfg.compute
    device = as_device(ccfg.device)
    backend = backend or make_backend(ccfg)  # check the compute options before any work
    model = load_model(cfg.model, inputs.checkpoint, trust_pickle=cfg.checkpoint.trust_pickle, strict=cfg.checkpoint.strict)
    data = build_data(cfg.data)
    forward, output = build_adapters(cfg.adapters)
    check_data_fits(model, data, forward, output, target_key=cfg.metrics.target_key)  # before the first tile
    metrics = build_metrics(cfg.metrics, data)
    flat, dir_attrs = load_directions(inputs.directions)
    axes = grid_axes(cfg.grid)
    _check_directions(flat, model, len(axes), inputs.directions)
    origin = None if inputs.origin is None else load_model(
        cfg.model, inputs.origin, trust_pickle=cfg.checkpoint.trust_pickle, strict=cfg.checkpoint.strict)
    evaluator = _evaluator(cfg, model, metrics, flat, device,
                           origin=None if origin is None else {n: p.detach() for n, p in origin.named_parameters()})
    check_memory_budget(evaluator, ccfg.memory_budget)
    resume = cfg.resume
    if resume:
        inputs = replace(inputs, store=_resume_path(resume))
    # one driver per store: a second run of it waits, then reuses the tiles the first one finished
    with file_lock(inputs.store, on_wait=lambda: _say(f"another run is evaluating {inputs.store}; waiting for it to finish.")):
        repaired = _repair(inputs.store)
        store = _open_or_create(inputs, axes, list(evaluator.metric_names), evaluator, flat, dir_attrs, resume=bool(resume))
        todo = store.missing_tiles()
        total_tiles = len(store.tiles())
        if todo:
            decision = evaluator.plan_compile(sum(t.size for t in todo))
            if decision.on:
                _say(f"torch.compile: {decision.reason}")
        seconds = backend.run(evaluator, store, todo, progress=ccfg.progress) if todo else 0.0
        backend_name = str(getattr(backend, "name", type(backend).__name__))
        store.update_attrs({"evaluation": evaluator.describe() | {"backend": backend_name}})
        if origin is not None:  # where this run's own checkpoint lies on the shared plane, and its values there
            subject = subject_on_plane(model, origin, flat, inputs.checkpoint)
            store.update_attrs({"subject": subject | {"values": _values_at_subject(cfg, model, data, flat, device)}})
    points = sum(t.size for t in todo)
    extra = {f"backend_{k}": float(v) for k, v in (getattr(backend, "last_run", None) or {}).items()
             if todo and (k.endswith("_seconds") or k == "workers")}
    return EvaluateOutputs(
        store=inputs.store,
        strategy=evaluator.strategy,
        tile_shape=tuple(store.tile_shape),
        points=Grid(axes).size,
        shape=tuple(len(a) for a in axes),
        tiles_computed=len(todo),
        tiles_reused=total_tiles - len(todo),
        seconds=seconds,
        metrics={
            "evaluate_seconds": seconds,
            "points_per_second": points / seconds if seconds > 0 else 0.0,
            "points_computed": float(points),
            "tiles_computed": float(len(todo)),
            "tiles_reused": float(total_tiles - len(todo)),
            "tiles_repaired": float(repaired),
        } | extra,
        backend=backend_name,
    )


def _evaluator(cfg: PipelineConfig, model: torch.nn.Module, metrics: Any, flat: np.ndarray, device: torch.device,
               *, origin: dict[str, torch.Tensor] | None = None, max_points: int | None = None) -> L.Evaluator:
    """The configured `landscapes.Evaluator` of ``model`` on the ``(k, n)`` directions ``flat``."""
    ccfg = cfg.compute
    forward, output = build_adapters(cfg.adapters)
    return L.Evaluator(
        model, metrics, torch.from_numpy(flat), device=device, strategy=str(ccfg.strategy),
        model_mode=str(ccfg.model_mode), memory_budget=ccfg.memory_budget,
        max_batch_points=max_points or ccfg.max_batch_points, forward=forward, output=output,
        bn_batches=ccfg.bn_batches, origin=origin, precision=str(ccfg.precision), compile=str(ccfg.compile),
    )


def _values_at_subject(cfg: PipelineConfig, model: torch.nn.Module, data: Any, flat: np.ndarray,
                       device: torch.device) -> dict[str, float]:
    """The metrics at the run's own checkpoint (its parameters and buffers), on the same data: on a
    shared plane the grid's centre is the origin, so these are the figures of the checkpoint itself."""
    own = _evaluator(cfg, model, build_metrics(cfg.metrics, data), flat, device, max_points=1)
    return {n: float(v[0]) for n, v in own.evaluate_points(np.zeros((1, flat.shape[0]))).items()}


def _say(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def _repair(path: Path) -> int:
    """Verify an existing store before reusing any tile of it; clear damaged tiles so they are recomputed.

    Returns the number of tiles cleared. Missing or truncated chunks, checksum mismatches and a
    lost ``done`` mask are found from the per-tile records (sizes and digests, no recomputation).
    """
    if not (path / "zarr.json").exists():
        return 0
    report = verify_store(path, repair=True)
    if not report.ok:
        for line in report.summary():
            _say(line)
        _say(f"recomputing {len(report.damaged_tiles)} damaged tile(s) of {path}.")
    return len(report.damaged_tiles)


def intact(outputs: EvaluateOutputs) -> str | None:
    """Why a finished run's landscape store cannot be reused (damaged, incomplete), or None."""
    try:
        report = verify_store(outputs.store)
    except (OSError, ValueError) as err:  # StoreError
        return str(err).splitlines()[0]
    if not report.ok:
        return report.summary()[0]
    if report.tiles_done != report.tiles:
        return f"{outputs.store} has {report.tiles - report.tiles_done} tile(s) not done"
    return None


def _check_directions(flat: np.ndarray, model: torch.nn.Module, k: int, path: Path) -> None:
    n = sum(p.numel() for p in model.parameters())
    if flat.ndim != 2 or flat.shape != (k, n):
        raise ShapeMismatchError(
            f"evaluate: the directions in {path} have shape {tuple(flat.shape)}, this run needs ({k}, {n}): one row "
            f"per grid axis (grid.dims={k}) and one column per parameter of {type(model).__name__}. They were made "
            f"for another model or grid; delete {path} (or run with tracking.reuse=false) so that the directions "
            "stage makes them again."
        )


def _resume_path(resume: Any) -> Path:
    """The store named by ``resume=``: the ``landscape.zarr`` folder or the folder holding it."""
    path = Path(str(resume)).expanduser().absolute()
    if not (path / "zarr.json").exists() and (path / "landscape.zarr" / "zarr.json").exists():
        path = path / "landscape.zarr"
    if not (path / "zarr.json").exists():
        raise StoreError(
            f"resume={resume!r}: no landscape store there ({path}); pass the landscape.zarr folder that a "
            "previous run wrote (its MLflow tag landscapes.store), or drop resume= to start afresh."
        )
    return path


def _open_or_create(inputs: EvaluateInputs, axes, metric_names, evaluator, flat, dir_attrs, *, resume: bool = False) -> LandscapeStore:
    how = f"resume={str(inputs.store)!r}" if resume else f"the landscape store {inputs.store}"
    fix = (
        "Pass resume= the store of this configuration, or drop resume= to start a fresh one"
        if resume else "Delete the store or change paths.root_dir to start afresh"
    )
    if (inputs.store / "zarr.json").exists():
        attrs = LandscapeStore.open(inputs.store, mode="r").attrs
        found = attrs.get("fingerprint")
        if found != inputs.fingerprint:
            differing = _differing_keys(attrs, inputs.provenance)
            raise StoreError(
                f"{how} was created for another configuration (fingerprint {found!r}, this run "
                f"{inputs.fingerprint!r}"
                + (f"; differing: {'; '.join(differing)}" if differing else "")
                + f"); refusing to mix results. {fix}"
                + (" (give the same overrides as the run that made it)" if resume and differing else "") + "."
            )
        store = LandscapeStore.open(inputs.store, mode="r+")
        shape = tuple(len(a) for a in axes)
        if tuple(store.shape) != shape or list(store.metrics) != metric_names:
            raise StoreError(
                f"{how} has shape {store.shape} and metrics {list(store.metrics)}, this run needs "
                f"{shape} and {metric_names}. {fix}."
            )
        return store
    if resume:
        raise StoreError(f"resume={str(inputs.store)!r}: no landscape store there; drop resume= to start afresh.")
    return _create(inputs, axes, metric_names, evaluator, flat, dir_attrs)


_PROVENANCE_KEYS = {"model": "model", "data": "data", "metrics_config": "metrics", "grid": "grid",
                    "directions_config": "directions", "model_mode": "compute.model_mode"}


def _differing_keys(store_attrs: dict[str, Any], provenance: dict[str, Any], limit: int = 6) -> list[str]:
    """Config keys whose value in a store's provenance differs from this run's, as 'key: store X, this run Y'."""
    out: list[str] = []

    def walk(key: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(f"{key}.{k}", a.get(k), b.get(k))
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            out.append(f"{key}: store {a!r}, this run {b!r}")

    plain = json.loads(json.dumps(provenance, default=str))
    for attr, key in _PROVENANCE_KEYS.items():
        if attr in store_attrs or attr in plain:
            walk(key, store_attrs.get(attr), plain.get(attr))
    return out[:limit]


def _create(inputs: EvaluateInputs, axes, metric_names, evaluator, flat, dir_attrs, *, overwrite: bool = False) -> LandscapeStore:
    tile_shape = tile_shape_for(tuple(len(a) for a in axes), evaluator.tile_points)
    attrs = {
        "fingerprint": inputs.fingerprint,
        "directions": {k: v for k, v in dir_attrs.items() if k != "parameters"},
        **json.loads(json.dumps(inputs.provenance, default=str)),
    }
    return LandscapeStore.create(
        inputs.store, axes=axes, metrics=metric_names, tile_shape=tile_shape, directions=flat, attrs=attrs,
        overwrite=overwrite,
    )


def theta0_index(axes: list[np.ndarray]) -> tuple[int, ...] | None:
    """Index of the grid point at coordinate 0 on every axis, if the grid has it."""
    idx = []
    for a in axes:
        hits = np.flatnonzero(a == 0.0)
        if hits.size == 0:
            return None
        idx.append(int(hits[0]))
    return tuple(idx)

