"""Stage 2: build the directions and store them as a (k, n) Zarr array with their provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import landscapes as L
from landscapes.errors import ConfigurationError
from landscapes.params import ParameterSpace
from pipelines.builders import load_model
from pipelines.config import PipelineConfig


@dataclass(frozen=True)
class DirectionsInputs:
    checkpoint: Path
    towards: tuple[Path, ...] = ()
    out_dir: Path = Path(".")


@dataclass(frozen=True)
class DirectionsOutputs:
    path: Path  # directions.zarr
    kind: str
    seeds: tuple[int, ...]
    normalization: str
    norms: tuple[float, ...]
    cosine: float | None
    cosine_after: float | None
    metrics: dict[str, float] = field(default_factory=dict)


def directions(cfg: PipelineConfig, inputs: DirectionsInputs) -> DirectionsOutputs:
    """Random (seeded, normalized) directions, or directions towards other checkpoints."""
    dcfg, dims = cfg.directions, int(cfg.grid.dims)
    trust, strict = cfg.checkpoint.trust_pickle, cfg.checkpoint.strict
    model = load_model(cfg.model, inputs.checkpoint, trust_pickle=trust, strict=strict)
    norm = None if dcfg.normalization == "none" else str(dcfg.normalization)
    ignore = None if dcfg.ignore == "none" else str(dcfg.ignore)
    seeds: tuple[int, ...] = ()
    if dcfg.kind == "random":
        seeds = tuple(int(dcfg.seed) + i for i in range(dims))
        dirs = [L.random_direction(model, normalization=norm, ignore=ignore, seed=s) for s in seeds]
    else:
        if len(inputs.towards) != dims:
            raise ConfigurationError(
                f"directions.towards has {len(inputs.towards)} checkpoint(s) but grid.dims={dims}; "
                f"give {dims} checkpoint(s) to move towards (directions.towards=[a.pt{', b.pt' if dims == 2 else ''}])."
            )
        dirs = []
        for path in inputs.towards:
            other = load_model(cfg.model, path, trust_pickle=trust, strict=strict)
            d = L.direction_between(model, other)
            dirs.append(L.normalize_direction(d, model, normalization=norm, ignore=ignore) if norm or ignore else d)
    cos = cos_after = None
    if dims == 2:
        cos = L.cosine(dirs[0], dirs[1])
        if dcfg.orthogonalize:
            result = L.orthogonalize(dirs[0], dirs[1])
            dirs[1], cos_after = result.direction, result.cosine_after
    space = ParameterSpace.from_module(model)
    flat = torch.stack([space.flatten(d) for d in dirs]).float().numpy()
    norms = tuple(float(np.linalg.norm(row.astype(np.float64))) for row in flat)
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    path = inputs.out_dir / "directions.zarr"
    save_directions(path, flat, {
        "kind": str(dcfg.kind), "seeds": list(seeds), "normalization": str(norm), "ignore": str(ignore),
        "towards": [str(p) for p in inputs.towards], "norms": list(norms), "cosine": cos,
        "cosine_after_orthogonalization": cos_after,
        "parameters": [[s.name, list(s.shape), s.kind] for s in space.specs],
    })
    metrics = {f"direction_{i}_norm": n for i, n in enumerate(norms)}
    if cos is not None:
        metrics["direction_cosine"] = cos
    return DirectionsOutputs(path, str(dcfg.kind), seeds, str(norm), norms, cos, cos_after, metrics)


def save_directions(path: Path, flat: np.ndarray, attrs: dict[str, Any]) -> None:
    """A (k, n) float32 array, chunked along n so workers can read it lazily."""
    arr = zarr.create_array(
        store=str(path), shape=flat.shape, dtype="float32", chunks=(1, min(flat.shape[1], 1 << 20)),
        dimension_names=("direction", "parameter"), overwrite=True,
    )
    arr[...] = flat
    arr.attrs.update(attrs)


def load_directions(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as err:
        raise ConfigurationError(
            f"directions store {path} cannot be opened ({type(err).__name__}); re-run the directions stage."
        ) from err
    return np.asarray(arr[...]), dict(arr.attrs)

