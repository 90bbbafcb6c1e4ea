"""The pipeline as a table of stages, and `run_pipeline`, which runs it under one parent run.

checkpoint ──► directions ──► evaluate ──► aggregate ──► report. Each row of `STAGES` names a
stage, the config sections its key covers, the stages it reads, and how its inputs are made;
`pipelines.driver` computes each key once and reuses or runs the stage as a child run. A new
stage is one row here and one function in ``pipelines/stages/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from pipelines import tracking
from pipelines.builders import check_config
from pipelines.config import to_typed
from pipelines.driver import VERSION, Flow, Stage, run_stages
from pipelines.inputs import checkpoint_inputs, towards_paths
from pipelines.paths import stores_dir
from pipelines.records import (
    HEADLINE_METRICS,
    headline_params,
    provenance,
    run_title,
    training_step,
)
from pipelines.stages import checkpoint as ck_stage
from pipelines.stages import directions as dr_stage
from pipelines.stages import evaluate as ev_stage
from pipelines.stages.aggregate import AggregateInputs, aggregate
from pipelines.stages.directions import DirectionsInputs
from pipelines.stages.evaluate import EvaluateInputs
from pipelines.stages.report import ReportInputs, report


def store_fingerprint(flow: Flow) -> str:
    """What a landscape's values depend on, not how they are computed: another backend resumes the store."""
    c = flow.cfg
    sections = {"model": c.model, "adapters": c.adapters, "data": c.data, "metrics": c.metrics, "grid": c.grid,
                "model_mode": c.compute.model_mode}
    if c.compute.model_mode == "recompute_bn":
        sections["bn_batches"] = c.compute.bn_batches
    return tracking.stage_key("evaluate", sections, (flow.identity["checkpoint"], flow.identity["directions"]), VERSION)


def _evaluate_inputs(flow: Flow) -> EvaluateInputs:
    fp, ck = store_fingerprint(flow), flow.outputs["checkpoint"]
    return EvaluateInputs(checkpoint=ck.path, directions=flow.outputs["directions"].path,
                          store=flow.stores / f"landscape-{fp[:16]}" / "landscape.zarr", fingerprint=fp,
                          provenance=provenance(flow.cfg, ck))


def _in_root(flow: Flow, path: Path) -> str | None:
    """Shared outputs belong to their project root: a run never reuses another root's store."""
    return None if Path(path).is_relative_to(flow.stores) else f"{path} belongs to another project root"


def _checkpoint_identity(flow: Flow, out: Any) -> str:
    """Downstream stages depend on the checkpoint's content, not on where it was read from."""
    return tracking.stage_key("checkpoint", {"sha256": out.sha256, "model": flow.cfg.model}, (), VERSION)


STAGES: tuple[Stage, ...] = (
    Stage("checkpoint", ck_stage.checkpoint, ("model", "checkpoint"), (), inputs=lambda f: f.source,
          identity=_checkpoint_identity, intact=lambda f, out: ck_stage.intact(out)),
    Stage("directions", dr_stage.directions, ("model", "directions", "grid"), ("checkpoint",),
          inputs=lambda f: DirectionsInputs(f.outputs["checkpoint"].path, f.towards),
          place=lambda f, key: {"out_dir": f.stores / f"directions-{key[:16]}"},
          intact=lambda f, out: _in_root(f, out.path) or dr_stage.intact(out)),
    Stage("evaluate", ev_stage.evaluate, ("model", "adapters", "data", "metrics", "grid", "compute", "resume"),
          ("checkpoint", "directions"),
          inputs=_evaluate_inputs, intact=lambda f, out: _in_root(f, out.store) or ev_stage.intact(out)),
    Stage("aggregate", aggregate, ("summary",), ("evaluate",), inputs=lambda f: AggregateInputs(f.outputs["evaluate"].store)),
    Stage("report", report, ("plot",), ("aggregate",), enabled=lambda cfg: cfg.plot.enabled,
          inputs=lambda f: ReportInputs(f.outputs["evaluate"].store, Path(f.cfg.paths.output_dir))),
)


def launched_experiment() -> str | None:
    """Inside ``mlflow run`` (``MLFLOW_RUN_ID`` set), the experiment MLflow opened the run in.

    MLflow Projects create the pipeline's run before our code starts, in the experiment named by
    ``--experiment-name``/``--experiment-id`` (``Default`` without them); the stage runs follow
    it, so that all runs of one ``mlflow run`` share one experiment whatever ``tracking.experiment`` says.
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or None


def run_pipeline(cfg: DictConfig, *, sweep_run_id: str | None = None, stages: tuple[Stage, ...] = STAGES) -> dict[str, Any]:
    """Run the stages up to ``stop_after`` under one parent run; return its id, the summary and the plots."""
    c = to_typed(cfg)
    check_config(c)  # before any run is opened or anything computed
    uri = tracking.configure(c.tracking.uri, request_timeout=c.tracking.request_timeout)
    exp_id = launched_experiment() or tracking.get_or_create_experiment(
        c.tracking.experiment, artifact_root=tracking.default_artifact_root(uri, Path(c.paths.artifacts_dir)))
    flow = Flow(c, checkpoint_inputs(c, uri), towards_paths(c, uri), stores_dir(c.paths.root_dir))
    tags = {"landscapes.checkpoint": flow.source.source}
    if flow.source.training_run_id:
        tags["landscapes.training_run"] = flow.source.training_run_id
    started = time.perf_counter()
    step = training_step(flow.source.source)
    with tracking.start_pipeline_run(exp_id, c.tracking.run_name or run_title(c, flow.source.source), tags,
                                     parent_run_id=sweep_run_id) as run:
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "config.yaml")
        tracking.log_params(headline_params(c) | ({"epoch": step} if step is not None else {}))
        run_stages(stages, flow, parent_run_id=run.info.run_id, experiment_id=exp_id)
        if "aggregate" in flow.outputs:
            _finish(flow, time.perf_counter() - started)
            if sweep_run_id and step is not None:  # the sweep charts the headline figures against the epoch
                figures = flow.outputs["aggregate"].metrics
                tracking.log_metrics({k: figures[k] for k in HEADLINE_METRICS if k in figures}, step=step, run_id=sweep_run_id)
    return _result(run.info.run_id, flow)


def _finish(flow: Flow, seconds: float) -> None:
    """Tag the parent run with what it made and log the summary figures on it."""
    ev = flow.outputs["evaluate"]
    mlflow.set_tags({
        "landscapes.checkpoint_sha256": flow.outputs["checkpoint"].sha256,
        "landscapes.directions": flow.identity["directions"][:16],
        "landscapes.store": str(ev.store),
        "landscapes.grid": "x".join(str(n) for n in ev.shape),
    })
    mlflow.log_metrics(flow.outputs["aggregate"].metrics | {"pipeline_seconds": seconds})
    for p in getattr(flow.outputs.get("report"), "plots", ()):
        if p.suffix == ".png":
            mlflow.log_artifact(str(p), artifact_path="plots")


def _result(run_id: str, flow: Flow) -> dict[str, Any]:
    out = flow.outputs
    result: dict[str, Any] = {"run_id": run_id, "summary": getattr(out.get("aggregate"), "summary", {}),
                              "plots": [str(p) for p in getattr(out.get("report"), "plots", ())]}
    for name, attr, as_key in (("checkpoint", "path", "checkpoint"), ("directions", "path", "directions"),
                               ("evaluate", "store", "store")):
        if name in out:
            result[as_key] = str(getattr(out[name], attr))
    return result
