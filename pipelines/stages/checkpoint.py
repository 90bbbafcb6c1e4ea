"""Stage 1: load the checkpoint into the configured model and record its identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from landscapes.checkpoints import checkpoint_identity, parameter_count
from pipelines.builders import load_model
from pipelines.config import PipelineConfig


@dataclass(frozen=True)
class CheckpointInputs:
    path: Path  # a local file (MLflow URIs are downloaded by the driver)
    source: str  # what the user gave: path or runs:/… models:/… URI
    training_run_id: str | None = None


@dataclass(frozen=True)
class CheckpointOutputs:
    path: Path
    source: str
    sha256: str
    size_bytes: int
    parameter_count: int
    training_run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def checkpoint(cfg: PipelineConfig, inputs: CheckpointInputs) -> CheckpointOutputs:
    """Check that the checkpoint loads strictly into ``cfg['model']``; nothing is computed before."""
    model = load_model(
        cfg.model, inputs.path, trust_pickle=cfg.checkpoint.trust_pickle, strict=cfg.checkpoint.strict
    )
    ident = checkpoint_identity(inputs.path)
    count = parameter_count(model)
    return CheckpointOutputs(
        path=Path(ident["path"]),
        source=inputs.source,
        sha256=ident["sha256"],
        size_bytes=int(ident["size_bytes"]),
        parameter_count=count,
        training_run_id=inputs.training_run_id,
        metrics={"parameter_count": float(count), "checkpoint_mb": ident["size_bytes"] / 2**20},
    )



def intact(outputs: CheckpointOutputs) -> str | None:
    """Why a finished run's checkpoint record no longer holds (the file changed or is gone), or None."""
    try:
        sha = checkpoint_identity(outputs.path)["sha256"]
    except (OSError, ValueError) as err:
        return f"{outputs.path}: {err}"
    return None if sha == outputs.sha256 else f"{outputs.path} changed since it was recorded (sha256 {sha[:12]}…)"
