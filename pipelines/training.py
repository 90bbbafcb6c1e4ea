"""Train the bundled demo model (DemoMLP on digits) and log the run to MLflow.

The command is ``python -m pipelines.train`` (`pipelines.train`); this module holds the work.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landscapes.checkpoints import checkpoint_identity
from landscapes.errors import ConfigurationError
from landscapes.integrity import atomic_file, atomic_write_bytes
from pipelines import tracking
from pipelines.demo import DemoMLP, load_digits_tensors

__all__ = ["TrainConfig", "TrainResult", "train", "train_demo", "finished_checkpoints"]

CHECKPOINT_ARTIFACT_DIR = "checkpoints"
COMPLETE_RECORD = "complete.json"
"""Written last by a training that finished: its run and checkpoints (name, sha256), oldest first."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a demo training run (field names equal `train_demo`'s keywords)."""

    out_dir: Path
    epochs: int = 30
    checkpoint_every: int = 10
    seed: int = 0
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    hidden: tuple[int, ...] = (128, 128)
    tracking_uri: str | None = None
    experiment: str = "landscapes-demo"
    run_name: str = "train-demo"
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        run_id: The MLflow run (tag ``landscapes.kind=train``).
        checkpoints: ``epoch_{e:03d}.pt`` state dicts, oldest first; epoch 0 is the
            initialisation and the last is the final epoch.
        final_accuracy: Accuracy on all 1797 digits after the last epoch.
        final_loss: Mean cross-entropy on all 1797 digits after the last epoch.
    """

    run_id: str
    checkpoints: list[Path]
    final_accuracy: float
    final_loss: float


def train(cfg: TrainConfig | Mapping[str, Any]) -> TrainResult:
    """Train DemoMLP on digits with SGD (momentum), deterministically from ``cfg.seed``.

    Checkpoints are ``<out_dir>/checkpoints/epoch_{e:03d}.pt`` (``state_dict`` only) at epoch 0,
    every ``checkpoint_every`` epochs and the last epoch. The MLflow run logs the settings as
    parameters, ``train_loss`` and ``train_accuracy`` at ``step=epoch`` (measured on the whole
    data set with the weights of that epoch's checkpoint, so step 0 is the initialisation),
    the checkpoints under the artifact folder ``checkpoints/``, and the tags
    ``landscapes.kind=train``, ``landscapes.model``, ``landscapes.dataset=digits``.

    Args:
        cfg: A `TrainConfig`, or a mapping of its fields.

    Returns:
        The run id, checkpoint paths and final metrics.

    Raises:
        ConfigurationError: A setting is out of range.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig(**dict(cfg))
    _validate(cfg)
    out_dir = Path(cfg.out_dir).expanduser().absolute()
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / COMPLETE_RECORD).unlink(missing_ok=True)  # until this training finishes, nothing is "the latest"
    for stale in ckpt_dir.glob("epoch_*.pt"):  # a new training replaces the previous one's checkpoints
        stale.unlink()

    x, y = load_digits_tensors()
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DemoMLP(hidden=cfg.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = nn.CrossEntropyLoss()
    save_at = {0, cfg.epochs, *range(cfg.checkpoint_every, cfg.epochs, cfg.checkpoint_every)}

    uri = tracking.configure(cfg.tracking_uri or tracking.default_tracking_uri(Path.cwd()))
    experiment_id = tracking.get_or_create_experiment(
        cfg.experiment, artifact_root=tracking.default_artifact_root(uri, out_dir / "mlartifacts")
    )
    tags = {
        tracking.TAG_KIND: "train",
        "landscapes.model": f"{DemoMLP.__module__}.{DemoMLP.__qualname__}",
        "landscapes.dataset": "digits",
        **cfg.tags,
    }
    checkpoints: list[Path] = []
    history: list[dict[str, float]] = []
    with tracking.start_pipeline_run(experiment_id, cfg.run_name, tags) as run:
        params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("tags",)}
        params.update(
            {
                "model._target_": tags["landscapes.model"],
                "optimizer": "SGD",
                "n_samples": len(y),
                "out_dir": str(out_dir),
            }
        )
        params.pop("tracking_uri")
        tracking.log_params(params)
        start = time.perf_counter()
        threads = torch.get_num_threads()
        # The model is tiny: intra-op threads only add synchronisation (60x slower measured
        # on 2 busy cores).
        torch.set_num_threads(1)
        try:
            for epoch in range(cfg.epochs + 1):
                if epoch > 0:
                    _train_epoch(model, optimizer, loss_fn, x, y, cfg.batch_size, generator)
                loss, accuracy = _evaluate(model, loss_fn, x, y)
                history.append({"train_loss": loss, "train_accuracy": accuracy})
                if epoch in save_at:
                    path = ckpt_dir / f"epoch_{epoch:03d}.pt"
                    _save_atomically(model.state_dict(), path)
                    checkpoints.append(path)
        finally:
            torch.set_num_threads(threads)
        tracking.log_metric_history(history)
        tracking.log_metrics({"train_seconds": time.perf_counter() - start})
        for path in checkpoints:
            tracking.log_artifact(path, CHECKPOINT_ARTIFACT_DIR)
        run_id = run.info.run_id
    # lets the pipeline link a landscape of these checkpoints to this training run
    (ckpt_dir / "mlflow_run_id").write_text(run_id + "\n")
    record = {"run_id": run_id, "epochs": cfg.epochs,
              "checkpoints": [{"file": p.name, "sha256": checkpoint_identity(p)["sha256"]} for p in checkpoints]}
    atomic_write_bytes(ckpt_dir / COMPLETE_RECORD, json.dumps(record, indent=1).encode(), fsync=True)
    return TrainResult(
        run_id=run_id, checkpoints=checkpoints, final_accuracy=accuracy, final_loss=loss
    )


def train_demo(
    out_dir: Path,
    *,
    epochs: int = 30,
    checkpoint_every: int = 10,
    seed: int = 0,
    lr: float = 0.05,
    batch_size: int = 64,
    tracking_uri: str | None = None,
    experiment: str = "landscapes-demo",
) -> TrainResult:
    """Train the demo model; see `train` for what is written and logged.

    Args:
        out_dir: Folder for ``checkpoints/`` (and artifacts when the store is not sqlite).
        epochs: Passes over the 1797 digits.
        checkpoint_every: Save a checkpoint every this many epochs (plus epochs 0 and last).
        seed: Seeds the initialisation and the batch order.
        lr: SGD learning rate (momentum 0.9).
        batch_size: Mini-batch size.
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or
            ``sqlite:///<cwd>/mlflow.db``.
        experiment: MLflow experiment name.

    Returns:
        The run id, checkpoint paths and final metrics.
    """
    return train(
        TrainConfig(
            out_dir=Path(out_dir),
            epochs=epochs,
            checkpoint_every=checkpoint_every,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
    )


def _validate(cfg: TrainConfig) -> None:
    checks = {
        "epochs": (cfg.epochs, cfg.epochs >= 1, "a positive integer"),
        "checkpoint_every": (
            cfg.checkpoint_every,
            cfg.checkpoint_every >= 1,
            "a positive integer",
        ),
        "batch_size": (cfg.batch_size, cfg.batch_size >= 1, "a positive integer"),
        "lr": (cfg.lr, cfg.lr > 0, "a positive number"),
    }
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ConfigurationError(
                f"train.{name}={value!r}: expected {expected}; set train.{name}."
            )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    model.train()
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()


@torch.no_grad()
def _evaluate(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float(loss_fn(logits, y)), float((logits.argmax(dim=1) == y).float().mean())



def finished_checkpoints(ckpt_dir: Path) -> list[Path] | None:
    """The checkpoints of the training that finished in ``ckpt_dir``, oldest first, or None.

    None when no training finished there (none ran, or one was killed: its ``epoch_*.pt`` files
    are not "the latest"), or when a checkpoint is missing or changed since it was recorded.
    """
    try:
        record = json.loads((Path(ckpt_dir) / COMPLETE_RECORD).read_text())
        paths = [Path(ckpt_dir) / c["file"] for c in record["checkpoints"]]
        if all(checkpoint_identity(p)["sha256"] == c["sha256"] for p, c in zip(paths, record["checkpoints"], strict=True)):
            return paths
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a killed training leaves no half-written file."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
