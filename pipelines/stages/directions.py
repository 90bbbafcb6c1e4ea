"""Stage 2: build the directions and store them as a (k, n) Zarr array with their provenance.

The store is written by `landscapes.directions_store.save_directions`: under a lock, to a
temporary name renamed into place, with a per-chunk digest manifest, so jobs sharing one
directions key never see a half-written store, and every reader verifies what it loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscapes as L
from landscapes.directions_store import load_directions, save_directions
from landscapes.errors import ConfigurationError
from landscapes.params import ParameterSpace
from pipelines.builders import load_model
from pipelines.config import PipelineConfig
from pipelines.stages.curvature import loss_metric, store_intact
from pipelines.stages.pca import pca_plane

__all__ = ["DirectionsInputs", "DirectionsOutputs", "directions", "intact", "load_directions", "save_directions"]


@dataclass(frozen=True)
class DirectionsInputs:
    checkpoint: Path
    towards: tuple[Path, ...] = ()
    out_dir: Path = Path(".")
    trajectory: tuple[Path, ...] = ()  # kind=pca: the training run's checkpoints, in order


@dataclass(frozen=True)
class HessianDirectionsInputs(DirectionsInputs):
    """The inputs of ``directions.kind=hessian``: ``loss`` names what the loss at θ0 reads (data,
    metrics, adapters, model mode, eigen-solver options), so the stage's key covers it."""

    loss: str = ""
    eigenvectors: Path | None = None  # the curvature stage's eigenvectors.zarr (same run, same settings), if any


@dataclass(frozen=True)
class DirectionsOutputs:
    path: Path  # directions.zarr
    kind: str
    seeds: tuple[int, ...]
    normalization: str
    norms: tuple[float, ...]
    cosine: float | None
    cosine_after: float | None
    sha256: str  # digest of the stored values (landscapes.directions_store manifest)
    metrics: dict[str, float] = field(default_factory=dict)


def directions(cfg: PipelineConfig, inputs: DirectionsInputs) -> DirectionsOutputs:
    """Random (seeded, normalized) directions, or directions towards other checkpoints."""
    dcfg, dims = cfg.directions, int(cfg.grid.dims)
    trust, strict = cfg.checkpoint.trust_pickle, cfg.checkpoint.strict
    model = load_model(cfg.model, inputs.checkpoint, trust_pickle=trust, strict=strict)
    norm = None if dcfg.normalization == "none" else str(dcfg.normalization)
    ignore = None if dcfg.ignore == "none" else str(dcfg.ignore)
    seeds: tuple[int, ...] = ()
    extra: dict[str, Any] = {}
    if dcfg.kind == "hessian":
        dirs, extra = _hessian(cfg, model, dims, getattr(inputs, "eigenvectors", None))
        norm, ignore = None, None  # unit eigenvectors, stored as they are
    elif dcfg.kind == "pca":
        dirs, extra = pca_plane(cfg, model, inputs.trajectory, dims, normalization=norm, ignore=ignore)
    elif dcfg.kind == "random":
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
    path = inputs.out_dir / "directions.zarr"
    record = save_directions(path, flat, {
        "kind": str(dcfg.kind), "seeds": list(seeds), "normalization": str(norm), "ignore": str(ignore),
        "towards": [str(p) for p in inputs.towards], "norms": list(norms), "cosine": cos,
        "cosine_after_orthogonalization": cos_after,
        "parameters": [[s.name, list(s.shape), s.kind] for s in space.specs], **extra,
    })
    metrics = {f"direction_{i}_norm": n for i, n in enumerate(norms)}
    metrics |= {f"direction_{i}_eigenvalue": v for i, v in enumerate(extra.get("eigenvalues", ()))}
    for what in ("explained_variance", "explained_variance_ratio"):  # kind=pca
        metrics |= {f"direction_{i}_{what}": v for i, v in enumerate(extra.get(what, ()))}
    if "trajectory" in extra:
        metrics["plane_explained_fraction"] = extra["trajectory"]["plane_explained"]
    if "hessian_vector_products" in extra:
        metrics["hessian_vector_products"] = float(extra["hessian_vector_products"])  # 0: read, not computed
    if cos is not None:
        metrics["direction_cosine"] = cos
    return DirectionsOutputs(path, str(dcfg.kind), seeds, str(norm), norms, cos, cos_after, record.sha256, metrics)


def _hessian(cfg: PipelineConfig, model: torch.nn.Module, dims: int,
             saved: Path | None = None) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The top ``dims`` Hessian eigenvectors of the dataset loss at θ0 (descending eigenvalues):
    read from the curvature stage's ``saved`` store when it holds them, else computed."""
    reused = _saved_eigenvectors(saved, model, dims) if saved is not None else None
    if reused is not None:
        return reused
    c = cfg.curvature
    loss, forward, output = loss_metric(cfg)
    eig = L.hessian_eigenvalues(
        model, None, loss, k=dims, which="largest", tol=c.tol, max_iter=c.max_iter, seed=c.seed, forward=forward,
        output=output, model_mode=str(cfg.compute.model_mode), target_key=cfg.metrics.target_key, hvp=str(c.hvp),
        bn_batches=cfg.compute.bn_batches,
    )
    vectors = [{k: v.detach().cpu() for k, v in d.items()} for d in eig.eigenvectors]
    return vectors, {"eigenvalues": [float(v) for v in eig.eigenvalues], "residuals": [float(r) for r in eig.residuals],
                     "converged": bool(eig.converged), "hessian_vector_products": int(eig.hvps)}


def _saved_eigenvectors(path: Path, model: torch.nn.Module,
                        dims: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]] | None:
    """The curvature stage's top eigenvectors, when the store is intact and fits this model and ``dims``."""
    flat, attrs = load_directions(path)  # verified: digests, finite, no zero row
    space = ParameterSpace.from_module(model)
    if flat.shape[0] < dims or flat.shape[1] != space.numel or attrs.get("kind") != "hessian":
        return None
    rows = torch.from_numpy(flat[:dims].astype(np.float32))
    vectors = [{k: v.clone() for k, v in space.unflatten(row).items()} for row in rows]
    return vectors, {"eigenvalues": attrs["eigenvalues"][:dims], "residuals": attrs["residuals"][:dims],
                     "converged": bool(attrs["converged"]), "hessian_vector_products": 0,
                     "eigenvectors_from": str(path)}


def intact(outputs: DirectionsOutputs) -> str | None:
    """Why a finished run's directions cannot be reused (missing, damaged, other values), or None."""
    return store_intact(outputs.path, outputs.sha256)
