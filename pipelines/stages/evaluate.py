"""Stage 3: evaluate the grid tile by tile into the landscape's Zarr store (resumable)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscapes as L
from landscapes.errors import StoreError
from landscapes.grid import Grid, tile_shape_for
from landscapes.store import LandscapeStore
from pipelines.backends import Backend, LocalBackend
from pipelines.builders import as_device, build_data, build_metrics, grid_axes, load_model
from pipelines.stages.directions import load_directions


@dataclass(frozen=True)
class EvaluateInputs:
    checkpoint: Path
    directions: Path
    store: Path  # where the landscape's store lives (reopened to resume)
    fingerprint: str  # what the store must have been created for
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateOutputs:
    store: Path
    strategy: str
    tile_shape: tuple[int, ...]
    points: int
    tiles_computed: int
    tiles_reused: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate(cfg: dict[str, Any], inputs: EvaluateInputs, backend: Backend | None = None) -> EvaluateOutputs:
    """Evaluate every tile not yet done, writing each to the store as it finishes."""
    backend = backend or LocalBackend()
    ccfg = cfg["compute"]
    model = load_model(cfg["model"], inputs.checkpoint, trust_pickle=cfg["checkpoint"]["trust_pickle"])
    metrics = build_metrics(cfg["metrics"], build_data(cfg["data"]))
    flat, dir_attrs = load_directions(inputs.directions)
    axes = grid_axes(cfg["grid"])
    evaluator = L.Evaluator(
        model, metrics, torch.from_numpy(flat), device=as_device(ccfg["device"]), strategy=ccfg["strategy"],
        model_mode=ccfg["model_mode"], memory_budget=ccfg["memory_budget"], max_batch_points=ccfg["max_batch_points"],
    )
    store = _open_or_create(inputs, axes, list(evaluator.metric_names), evaluator, flat, dir_attrs)
    todo = store.missing_tiles()
    total_tiles = len(store.tiles())
    seconds = backend.run(evaluator, store, todo, progress=ccfg["progress"]) if todo else 0.0
    points = sum(t.size for t in todo)
    store.update_attrs({"evaluation": evaluator.describe()})
    return EvaluateOutputs(
        store=inputs.store,
        strategy=evaluator.strategy,
        tile_shape=tuple(store.tile_shape),
        points=Grid(axes).size,
        tiles_computed=len(todo),
        tiles_reused=total_tiles - len(todo),
        seconds=seconds,
        metrics={
            "evaluate_seconds": seconds,
            "points_per_second": points / seconds if seconds > 0 else 0.0,
            "tiles_computed": float(len(todo)),
            "tiles_reused": float(total_tiles - len(todo)),
        },
    )


def _open_or_create(inputs: EvaluateInputs, axes, metric_names, evaluator, flat, dir_attrs) -> LandscapeStore:
    if (inputs.store / "zarr.json").exists():
        store = LandscapeStore.open(inputs.store, mode="r+")
        found = store.attrs.get("fingerprint")
        if found != inputs.fingerprint:
            raise StoreError(
                f"the landscape store {inputs.store} was created for another configuration "
                f"(fingerprint {found!r}, this run {inputs.fingerprint!r}); refusing to mix results. "
                "Delete the store or change paths to start afresh."
            )
        shape = tuple(len(a) for a in axes)
        if tuple(store.shape) != shape or list(store.metrics) != metric_names:
            raise StoreError(
                f"the landscape store {inputs.store} has shape {store.shape} and metrics "
                f"{list(store.metrics)}, this run needs {shape} and {metric_names}; delete it to start afresh."
            )
        return store
    tile_shape = tile_shape_for(tuple(len(a) for a in axes), evaluator.tile_points)
    attrs = {
        "fingerprint": inputs.fingerprint,
        "directions": {k: v for k, v in dir_attrs.items() if k != "parameters"},
        **json.loads(json.dumps(inputs.provenance, default=str)),
    }
    return LandscapeStore.create(
        inputs.store, axes=axes, metrics=metric_names, tile_shape=tile_shape, directions=flat, attrs=attrs,
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
