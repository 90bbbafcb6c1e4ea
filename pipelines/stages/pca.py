"""``directions.kind=pca``: the plane of a training run, for the directions stage.

The directions are `landscapes.pca_directions` of the trajectory's checkpoints (their
displacements from θ0, or from ``directions.origin`` on a shared plane); the trajectory is then
projected onto that plane (`landscapes.project_trajectory`, every parameter counted, so a
checkpoint whose biases moved is honestly off a plane without bias directions). Both go into
the directions store's attributes, and from there into every landscape drawn on the plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscapes as L
from landscapes.plots import checkpoint_name
from pipelines.builders import load_model
from pipelines.config import PipelineConfig

__all__ = ["pca_plane", "subject_on_plane", "trajectory_record"]


def pca_plane(
    cfg: PipelineConfig, model: torch.nn.Module, trajectory: tuple[Path, ...], dims: int, *,
    normalization: str | None, ignore: str | None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The first ``dims`` principal directions of ``trajectory`` around ``model`` (θ0 or the origin),
    and what to record with them: explained variance, and the trajectory projected onto the plane."""
    trust, strict = cfg.checkpoint.trust_pickle, cfg.checkpoint.strict
    states = [load_model(cfg.model, p, trust_pickle=trust, strict=strict) for p in trajectory]
    pca = L.pca_directions(states, reference=model, k=dims, ignore=ignore, normalization=normalization,
                           center=cfg.directions.center, model=model)
    directions = list(pca.directions)
    projection = L.project_trajectory(states, model, directions)
    info = {k: v for k, v in pca.describe().items() if k not in ("kind", "normalization", "ignore", "k")}
    if cfg.directions.scale_to_trajectory:  # direction j times the largest |coordinate| along it: coords in [-1, 1]
        scale = np.abs(projection.coords).max(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        directions = [{n: t * float(s) for n, t in d.items()} for d, s in zip(directions, scale, strict=True)]
        projection = L.Projection(projection.coords / scale, projection.distance, projection.norm, projection.explained)
        info["trajectory_scale"] = scale.tolist()
    return directions, {**info, "trajectory": trajectory_record(trajectory, projection)}


def trajectory_record(paths: tuple[Path, ...] | list[Path], projection: L.Projection) -> dict[str, Any]:
    """JSON-able record of checkpoints projected onto a plane; ``plane_explained`` is the share of the
    trajectory's squared displacement the plane explains, ``1 − Σ distance² / Σ norm²``."""
    norm2 = float(np.sum(projection.norm**2))
    total = 1.0 - float(np.sum(projection.distance**2)) / norm2 if norm2 > 0 else 1.0
    return {
        "checkpoints": [str(p) for p in paths],
        "labels": [checkpoint_name(str(p)) for p in paths],
        "coords": projection.coords.tolist(),
        "distance": projection.distance.tolist(),
        "norm": projection.norm.tolist(),
        "explained": projection.explained.tolist(),
        "plane_explained": max(0.0, min(1.0, total)),
    }


def subject_on_plane(model: torch.nn.Module, origin: torch.nn.Module, flat: np.ndarray, path: Path) -> dict[str, Any]:
    """Where ``model`` (a sweep job's checkpoint at ``path``) lies on the shared plane through
    ``origin`` spanned by the ``(k, n)`` directions ``flat``: a `trajectory_record` of one point."""
    space = L.ParameterSpace.from_module(origin)
    directions = [space.unflatten(torch.from_numpy(np.ascontiguousarray(row))) for row in flat]
    return trajectory_record([path], L.project_trajectory([model], origin, directions))
