"""What a pipeline run records beside its stages: headline parameters and the store's provenance."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import landscapes
from pipelines import tracking
from pipelines.builders import grid_axes
from pipelines.config import PipelineConfig
from pipelines.driver import Flow
from pipelines.stages.checkpoint import CheckpointOutputs

__all__ = ["headline_params", "provenance", "run_title", "training_step", "HEADLINE_METRICS", "record_outcome", "result_of",
           "data_fingerprint", "data_input", "log_data_input", "describe_run"]


def headline_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The parent run's parameters: what a reader compares runs by."""
    return {
        "model": cfg.model.get("_target_"), "checkpoint.path": cfg.checkpoint.path or "demo (latest)",
        "directions": cfg.directions, "grid": cfg.grid,
        "data": {"name": cfg.data.name, "limit": cfg.data.limit, "batch_size": cfg.data.batch_size},
        "compute": {k: getattr(cfg.compute, k) for k in ("device", "strategy", "model_mode", "backend", "precision")},
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


def data_fingerprint(cfg: PipelineConfig) -> str:
    """What selects the evaluated samples (the dataset's config and ``data.limit``), hashed: 16 hex digits.

    The store fingerprint covers the same config (with the batch size); this one names the data alone,
    so runs on the same samples show the same digest in MLflow's Dataset column.
    """
    return tracking.stage_key("data", {"dataset": cfg.data.dataset, "limit": cfg.data.limit}, (), "")[:16]


def data_input(cfg: PipelineConfig) -> MetaDataset:
    """The evaluation data as an MLflow dataset: ``data.name``, its fingerprint as digest, the data config as source."""
    source = CodeDatasetSource({"dataset": json.dumps(cfg.data.dataset, sort_keys=True, default=str),
                                "limit": str(cfg.data.limit), "batch_size": str(cfg.data.batch_size)})
    return MetaDataset(source, name=cfg.data.name, digest=data_fingerprint(cfg))


def log_data_input(cfg: PipelineConfig, run_id: str) -> None:
    """Log the evaluation data as ``run_id``'s dataset input (context ``evaluation``), unless it has it already."""
    client = MlflowClient()
    meta = data_input(cfg).to_dict()
    if any(d.dataset.name == meta["name"] and d.dataset.digest == meta["digest"]
           for d in client.get_run(run_id).inputs.dataset_inputs):
        return
    entity = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"], source=meta["source"])
    client.log_inputs(run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])])


HEADLINE_METRICS = ("loss_at_theta0", "accuracy_at_theta0", "loss_at_checkpoint", "accuracy_at_checkpoint", "loss_min", "flat_area_tol0.1", "sharpness_r0.1",
                    "sharpness_rel_r0.1", "lambda_max", "lambda_min", "hessian_trace", "eigen_ratio", "negative_mass",
                    "average_sharpness", "worst_case_sharpness", "linear_loss_barrier_frankle",
                    "bezier_loss_barrier_frankle")
"""What a sweep over a training run's checkpoints charts against the epoch (on a shared plane θ0 is
the one origin, so ``*_at_checkpoint``, the values at each job's own checkpoint, carry the trend)."""

_STEP = re.compile(r"(?:epoch|ep|step|iter)[_\-=]?(\d+)", re.IGNORECASE)


def training_step(source: str) -> int | None:
    """The epoch (or step) a checkpoint was saved at, read from its name (``epoch_010.pt`` -> 10)."""
    found = _STEP.findall(Path(source).stem)
    return int(found[-1]) if found else None


def run_title(cfg: PipelineConfig, source: str) -> str:
    """A short, telling run name: checkpoint · grid · directions (``epoch_010 · plane 21² filter s0``)."""
    stem = _short(source)
    if cfg.stop_after == "curvature":
        return f"{stem} · curvature"
    steps = cfg.grid.steps if isinstance(cfg.grid.steps, (list, tuple)) else [cfg.grid.steps] * cfg.grid.dims
    if cfg.grid.dims == 1:
        grid = f"line {steps[0]}"
    else:
        grid = f"plane {steps[0]}²" if len(set(steps)) == 1 else "plane " + "×".join(map(str, steps))
    d = cfg.directions
    if d.kind == "random":
        how = f"{d.normalization} s{d.seed}"
    else:
        how = _directions_text(cfg)
    if d.origin:  # the shared plane of a sweep: name where it goes through
        how += f" @ {_short(d.origin)}"
    return f"{stem} · {grid} {how}"


def _short(source: str) -> str:
    """A checkpoint's short name: a file's stem (``epoch_010``), other sources as they are."""
    return Path(source).stem if ("/" in source or "." in source) else source


def _directions_text(cfg: PipelineConfig) -> str:
    d = cfg.directions
    if d.kind == "hessian":
        return "hessian eigenvectors"
    if d.kind == "pca":
        named = [t for t in d.trajectory if not any(c in t for c in "*?[")]  # a glob's count is known later
        return f"pca of {len(named)} checkpoints" if named and len(named) == len(d.trajectory) else "pca of the trajectory"
    if d.kind != "random":
        return "towards " + ", ".join(Path(t).stem for t in d.towards)
    norm = "not normalized" if str(d.normalization) == "none" else f"{d.normalization}-normalized"
    return f"random, {norm}, seed {d.seed}" + (", orthogonalized" if d.orthogonalize else "")


def describe_run(flow: Flow, figures: dict[str, float]) -> str:
    """The pipeline run's description (Markdown, shown atop its MLflow page): the headline numbers,
    the grid, the directions, the store."""
    cfg, out = flow.cfg, flow.outputs
    name = _short(flow.source.source)

    def fig(key: str, label: str, fmt: str = ".4g") -> str | None:
        return f"{label} **{figures[key]:{fmt}}**" if key in figures else None

    shared = cfg.directions.origin
    # on a shared plane θ0 is the sweep's one origin: the checkpoint's own values come first
    head = [fig("loss_at_checkpoint", f"loss at {name}"), fig("accuracy_at_checkpoint", f"accuracy at {name}", ".2%"),
            fig("loss_at_theta0", f"loss at the origin {_short(shared)}" if shared else "loss at θ0"),
            fig("accuracy_at_theta0", f"accuracy at the origin {_short(shared)}" if shared else "accuracy at θ0", ".2%"),
            fig("loss_min", "lowest loss on the grid"), fig("lambda_max", "λmax"), fig("hessian_trace", "tr(H)")]
    lines = [f"**{name}** on {cfg.data.name}" + (f": {', '.join(h for h in head if h)}" if any(head) else "")]
    if "evaluate" in out:
        axes = grid_axes(cfg.grid)
        points = " × ".join(str(len(a)) for a in axes)
        spans = " × ".join(f"[{a[0]:g}, {a[-1]:g}]" for a in axes)
        lines.append(f"- grid: {points} points on {spans}; directions: {_directions_text(cfg)}")
        shape = [fig(f"sharpness_r{cfg.summary.radius:g}", f"sharpness within {cfg.summary.radius:g}"),
                 fig(f"flat_area_tol{cfg.summary.flat_tolerance:g}", f"flat area (tol {cfg.summary.flat_tolerance:g})", ".2%")]
        if any(shape):
            lines.append("- " + ", ".join(s for s in shape if s))
        lines.append(f"- store: `{out['evaluate'].store}`")
    last = next(reversed(out), None)
    if last is not None and last != "report" and cfg.stop_after == last:
        lines.append(f"- stopped after the {last} stage (stop_after={last})")
    return "\n".join(lines)


def record_outcome(flow: Flow, seconds: float, *, sweep_run_id: str | None, step: int | None) -> None:
    """Tag the active pipeline run with what it made and log its figures (on the sweep too, at ``step``).

    The figures are the stages' ``outputs.figures`` (the landscape's summary, the curvature at θ0):
    they describe the result, so they are logged here, once; each stage's run keeps only its own
    measurements (``outputs.metrics``: seconds, points per second, norms).
    """
    out: dict[str, Any] = flow.outputs
    figures: dict[str, float] = {}
    for outputs in out.values():
        figures |= getattr(outputs, "figures", None) or {}
    if "evaluate" in out:  # the stage run that read the data (this pipeline's or the reused one)
        run = MlflowClient().get_run(mlflow.active_run().info.run_id)
        log_data_input(flow.cfg, run.data.tags[f"{tracking.TAG_PARENT_STAGE_PREFIX}evaluate"])
    if "aggregate" in out:
        ev = out["evaluate"]
        mlflow.set_tags({
            "landscapes.checkpoint_sha256": out["checkpoint"].sha256,
            "landscapes.directions": flow.identity["directions"][:16],
            "landscapes.store": str(ev.store),
            "landscapes.grid": "x".join(str(n) for n in ev.shape),
        })
        for p in getattr(out.get("report"), "plots", ()):
            if p.suffix == ".png":
                mlflow.log_artifact(str(p), artifact_path="plots")
    mlflow.set_tag("mlflow.note.content", describe_run(flow, figures))
    if figures:
        mlflow.log_metrics(figures | {"pipeline_seconds": seconds})
    if figures and sweep_run_id and step is not None:  # the sweep charts the headline figures against the epoch
        mlflow.log_metrics({k: figures[k] for k in HEADLINE_METRICS if k in figures}, step=step, run_id=sweep_run_id)


def result_of(run_id: str, flow: Flow) -> dict[str, Any]:
    """What `run_pipeline` returns: the run, the summary, the plots, and the paths of what was made."""
    out = flow.outputs
    result: dict[str, Any] = {"run_id": run_id, "summary": getattr(out.get("aggregate"), "summary", {}),
                              "plots": [str(p) for p in getattr(out.get("report"), "plots", ())]}
    for name, attr, as_key in (("checkpoint", "path", "checkpoint"), ("directions", "path", "directions"),
                               ("evaluate", "store", "store")):
        if name in out:
            result[as_key] = str(getattr(out[name], attr))
    return result
