"""Where a run's checkpoints come from: a file, an MLflow URI, or the demo's latest checkpoint."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from landscapes.errors import CheckpointNotFoundError, ConfigurationError
from pipelines.checkpoint_sources import resolve_checkpoint_file, source_run_of
from pipelines.config import PipelineConfig
from pipelines.stages.checkpoint import CheckpointInputs

__all__ = ["checkpoint_inputs", "towards_paths", "trajectory_paths", "origin_inputs", "connectivity_towards", "demo_train_config", "training_run_of", "mlflow_cache_dir"]

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def checkpoint_inputs(
    cfg: PipelineConfig, uri: str, source: str | None = None, key: str = "checkpoint.path"
) -> CheckpointInputs:
    """A local file for the configured checkpoint: a path, an MLflow URI, or the demo's latest."""
    source = source if source is not None else cfg.checkpoint.path
    if source is None:
        return _demo_checkpoint(cfg, uri)
    if source.startswith(_MLFLOW_SCHEMES):
        return _download(cfg, source, key)
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


def trajectory_paths(cfg: PipelineConfig, uri: str) -> tuple[Path, ...]:
    """Local files of ``directions.trajectory`` in training order; an entry with ``*`` or ``?`` is a
    glob (relative to ``paths.root_dir``), its matches sorted by the numbers in their names."""
    paths: list[Path] = []
    for i, entry in enumerate(cfg.directions.trajectory or []):
        key = f"directions.trajectory[{i}]"
        if any(c in entry for c in "*?[") and not entry.startswith(_MLFLOW_SCHEMES):
            pattern = Path(entry).expanduser()
            base = pattern if pattern.is_absolute() else Path(cfg.paths.root_dir) / pattern
            found = sorted(Path(base.anchor).glob(str(base.relative_to(base.anchor))), key=_natural)
            if not found:
                raise CheckpointNotFoundError(
                    f"{key}={entry!r}: the pattern matches no file ({base}); give the checkpoints of a training "
                    "run, e.g. directions.trajectory=[outputs/demo/checkpoints/epoch_*.pt]."
                )
            paths += [checkpoint_inputs(cfg, uri, source=str(f), key=key).path for f in found]
        else:
            paths.append(checkpoint_inputs(cfg, uri, source=entry, key=key).path)
    found = tuple(dict.fromkeys(paths))
    if cfg.directions.kind == "pca" and len(found) < 2:
        raise ConfigurationError(
            f"directions.kind=pca needs the checkpoints of a training run in directions.trajectory, got "
            f"{len(found)}; give at least two, e.g. directions.trajectory=[outputs/demo/checkpoints/epoch_*.pt]."
        )
    return found


def origin_inputs(cfg: PipelineConfig, uri: str) -> CheckpointInputs | None:
    """The checkpoint of ``directions.origin`` (the shared plane of a sweep), or None."""
    origin = cfg.directions.origin
    return None if origin is None else checkpoint_inputs(cfg, uri, source=origin, key="directions.origin")


def connectivity_towards(cfg: PipelineConfig, uri: str) -> Path | None:
    """The local file of ``connectivity.towards`` when the connectivity stage runs, else None."""
    c = cfg.connectivity
    if not c.enabled:
        return None
    if not c.towards:
        raise ConfigurationError(
            "connectivity.towards is missing: give the checkpoint to connect θ0 to, e.g. "
            "connectivity.towards=outputs/demo/checkpoints/epoch_000.pt (or a runs:/ URI)."
        )
    return checkpoint_inputs(cfg, uri, source=c.towards, key="connectivity.towards").path


def _natural(path: Path) -> list[Any]:
    """``epoch_2`` before ``epoch_10``: names compared with their numbers as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


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


def mlflow_cache_dir(cfg: PipelineConfig) -> Path:
    """Where MLflow checkpoints are downloaded: ``<paths.root_dir>/outputs/cache/mlflow``."""
    return Path(cfg.paths.root_dir) / "outputs" / "cache" / "mlflow"


def _download(cfg: PipelineConfig, uri: str, key: str = "checkpoint.path") -> CheckpointInputs:
    """Download ``uri`` into the project's cache, named by the checkpoint's content.

    Each download goes to a fresh folder in the cache (so parallel jobs never write one file
    together), then moves to ``<cache>/<sha256[:16] of the file>-<sha256[:8] of the URI>/``:
    the same checkpoint from the same URI always lands at the same path (a re-run reuses the
    checkpoint stage, whose key is the path), and another one (``models:/name/latest`` after a
    new version) at another path.
    """
    cache = mlflow_cache_dir(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache)).resolve()
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))).resolve()
        except Exception as err:
            raise CheckpointNotFoundError(
                f"{key}={uri!r}: MLflow cannot download it ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "check the run id / model name and the tracking URI."
            ) from err
        file = resolve_checkpoint_file(local, uri, trust_pickle=cfg.checkpoint.trust_pickle, key=key)
        run_id = source_run_of(uri, key=key)
        final = cache / f"{_sha256(file)[:16]}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"
        try:
            os.rename(tmp, final)  # atomic; fails if an earlier run (or a parallel job) put it there
        except OSError:
            if not final.is_dir():
                raise
        path = final / file.relative_to(tmp)
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{key}={uri!r}: the cached download {final} lacks {file.relative_to(tmp)}; delete {final} "
                "and run again."
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointInputs(path=path, source=uri, training_run_id=run_id)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _demo_checkpoint(cfg: PipelineConfig, uri: str) -> CheckpointInputs:
    """The last checkpoint of the demo training that finished (training it first if none did)."""
    from pipelines.training import finished_checkpoints, train

    ckpt_dir = Path(cfg.paths.demo_dir) / "checkpoints"
    found = finished_checkpoints(ckpt_dir)
    if not found:
        print(f"No checkpoint configured and no finished demo training in {ckpt_dir}: training the demo model first.")
        found = train(demo_train_config(cfg, uri)).checkpoints
    return CheckpointInputs(path=found[-1].resolve(), source=str(found[-1]), training_run_id=training_run_of(found[-1]))
