"""What a pipeline run records beside its stages: headline parameters and the store's provenance."""

from __future__ import annotations

import dataclasses
from typing import Any

import mlflow
import torch

import landscapes
from pipelines.config import PipelineConfig
from pipelines.stages.checkpoint import CheckpointOutputs

__all__ = ["headline_params", "provenance"]


def headline_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The parent run's parameters: what a reader compares runs by."""
    return {
        "model": cfg.model.get("_target_"), "checkpoint.path": cfg.checkpoint.path or "demo (latest)",
        "directions": cfg.directions, "grid": cfg.grid,
        "data": {"name": cfg.data.name, "limit": cfg.data.limit, "batch_size": cfg.data.batch_size},
        "compute": {k: getattr(cfg.compute, k) for k in ("device", "strategy", "model_mode", "backend")},
    }


def provenance(cfg: PipelineConfig, ck: CheckpointOutputs) -> dict[str, Any]:
    """The landscape store's provenance attributes: checkpoint, config sections, versions."""
    plain = dataclasses.asdict
    return {
        "checkpoint": {"source": ck.source, "path": str(ck.path), "sha256": ck.sha256, "parameter_count": ck.parameter_count,
                       "training_run_id": ck.training_run_id},
        "model": cfg.model, "data": plain(cfg.data), "metrics_config": plain(cfg.metrics), "grid": plain(cfg.grid),
        "directions_config": plain(cfg.directions), "model_mode": str(cfg.compute.model_mode),
        "versions": {"landscapes": landscapes.__version__, "torch": torch.__version__, "mlflow": mlflow.__version__},
    }
