"""Where a run's checkpoints come from: a file, an MLflow URI, or the demo's latest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from landscapes.errors import CheckpointNotFoundError, ConfigurationError
from pipelines.config import PipelineConfig
from pipelines.stages.checkpoint import CheckpointInputs

__all__ = ["checkpoint_inputs", "towards_paths", "demo_train_config", "training_run_of"]

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def checkpoint_inputs(
    cfg: PipelineConfig, uri: str, source: str | None = None, key: str = "checkpoint.path"
) -> CheckpointInputs:
    """A local file for the configured checkpoint: a path, an MLflow URI, or the demo's latest."""
    source = source if source is not None else cfg.checkpoint.path
    if source is None:
        return _demo_checkpoint(cfg, uri)
    if source.startswith(_MLFLOW_SCHEMES):
        return _download(source, key)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(cfg.paths.root_dir) / path
    if not path.exists():
        demo = ", or leave checkpoint.path=null for the demo model" if key == "checkpoint.path" else ""
        raise CheckpointNotFoundError(
            f"{key}={source!r}: no such file ({path}); give a .pt/.pth/.safetensors/.ckpt "
            f"file or an MLflow runs:/ or models:/ URI{demo}."
        )
    return CheckpointInputs(path=path.resolve(), source=str(source), training_run_id=training_run_of(path))


def towards_paths(cfg: PipelineConfig, uri: str) -> tuple[Path, ...]:
    """Local files of ``directions.towards`` (the checkpoints that directions point at)."""
    return tuple(
        checkpoint_inputs(cfg, uri, source=t, key=f"directions.towards[{i}]").path
        for i, t in enumerate(cfg.directions.towards or [])
    )


def training_run_of(path: Path) -> str | None:
    """The training run that wrote ``path``, from the ``mlflow_run_id`` marker beside it."""
    marker = path.parent / "mlflow_run_id"
    return marker.read_text().strip() if marker.exists() else None


def demo_train_config(cfg: PipelineConfig, uri: str) -> dict[str, Any]:
    """`pipelines.training.train`'s settings for the demo, from ``train`` and ``paths.demo_dir``."""
    import dataclasses

    opts = dataclasses.asdict(cfg.train)
    opts.setdefault("experiment", cfg.tracking.experiment)
    return {"out_dir": Path(cfg.paths.demo_dir), "tracking_uri": uri, **opts}


def _download(uri: str, key: str = "checkpoint.path") -> CheckpointInputs:
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:
        raise CheckpointNotFoundError(
            f"{key}={uri!r}: MLflow cannot download it ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "check the run id / model name and the tracking URI."
        ) from err
    if local.is_dir():
        files = [p for p in local.rglob("*") if p.suffix in _CHECKPOINT_SUFFIXES]
        if len(files) != 1:
            raise ConfigurationError(
                f"{key}={uri!r} is a folder with {len(files)} checkpoint files; point at one file."
            )
        local = files[0]
    run_id = uri.split("/")[1] if uri.startswith("runs:/") else None
    return CheckpointInputs(path=local, source=uri, training_run_id=run_id)


def _demo_checkpoint(cfg: PipelineConfig, uri: str) -> CheckpointInputs:
    """The last checkpoint of the demo training that finished (training it first if none did)."""
    from pipelines.training import finished_checkpoints, train

    ckpt_dir = Path(cfg.paths.demo_dir) / "checkpoints"
    found = finished_checkpoints(ckpt_dir)
    if not found:
        print(f"No checkpoint configured and no finished demo training in {ckpt_dir}: training the demo model first.")
        found = train(demo_train_config(cfg, uri)).checkpoints
    return CheckpointInputs(path=found[-1].resolve(), source=str(found[-1]), training_run_id=training_run_of(found[-1]))
