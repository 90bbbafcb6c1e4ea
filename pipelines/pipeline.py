"""The pipeline as a table of stages, and `run_pipeline`, which runs it under one parent run.

checkpoint ──► [curvature] ──► [connectivity] ──► [origin] ──► directions ──► evaluate ──► aggregate ──► report
(curvature when ``curvature.enabled``, connectivity when ``connectivity.enabled``, origin when
``directions.origin`` puts the plane through another checkpoint; ``stop_after=curvature`` or
``stop_after=connectivity`` computes them without a grid). Each row of `STAGES` names a
stage, the config sections its key covers, the stages it reads, and how its inputs are made;
`pipelines.driver` computes each key once and reuses or runs the stage as a child run. A new
stage is one row here and one function in ``pipelines/stages/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from landscapes.plots import PLANE_ATTR
from pipelines import tracking
from pipelines.builders import check_config
from pipelines.config import PipelineConfig, to_typed
from pipelines.driver import VERSION, Flow, Stage, run_stages
from pipelines.inputs import (
    checkpoint_inputs,
    connectivity_towards,
    origin_inputs,
    towards_paths,
    trajectory_paths,
)
from pipelines.paths import stores_dir
from pipelines.records import (
    headline_params,
    log_data_input,
    provenance,
    record_outcome,
    result_of,
    run_title,
    training_step,
)
from pipelines.stages import checkpoint as ck_stage
from pipelines.stages import connectivity as cn_stage
from pipelines.stages import curvature as cv_stage
from pipelines.stages import directions as dr_stage
from pipelines.stages import evaluate as ev_stage
from pipelines.stages.aggregate import AggregateInputs, aggregate
from pipelines.stages.connectivity import ConnectivityInputs
from pipelines.stages.curvature import CurvatureInputs
from pipelines.stages.directions import DirectionsInputs, HessianDirectionsInputs
from pipelines.stages.evaluate import EvaluateInputs
from pipelines.stages.report import ReportInputs, report


def store_fingerprint(flow: Flow) -> str:
    """What a landscape's values depend on, not how they are computed: another backend resumes the store."""
    c = flow.cfg
    sections = {"model": c.model, "adapters": c.adapters, "data": c.data, "metrics": c.metrics, "grid": c.grid,
                "model_mode": c.compute.model_mode}
    if c.compute.model_mode == "recompute_bn":
        sections["bn_batches"] = c.compute.bn_batches
    if c.compute.precision != "fp32":  # fp32 stores keep the fingerprint they had before precision existed
        sections["precision"] = str(c.compute.precision)
    return tracking.stage_key("evaluate", sections, (flow.identity["checkpoint"], flow.identity["directions"]), VERSION)


def _evaluate_inputs(flow: Flow) -> EvaluateInputs:
    fp, ck = store_fingerprint(flow), flow.outputs["checkpoint"]
    shared = flow.cfg.directions.origin is not None
    return EvaluateInputs(checkpoint=ck.path, directions=flow.outputs["directions"].path,
                          store=flow.stores / f"landscape-{fp[:16]}" / "landscape.zarr", fingerprint=fp,
                          provenance=provenance(flow.cfg, ck) | plane_record(flow),
                          origin=flow.outputs["origin"].path if shared else None)


def plane_record(flow: Flow) -> dict[str, Any]:
    """The plane a landscape lies on, for its store: ``plane`` (mode, origin, directions digest, grid)
    and its id ``landscapes.plane``, a digest of origin, directions and grid: two stores with one id
    hold values at the same points of weight space, which the compare stage may subtract."""
    c = flow.cfg
    origin = flow.outputs[_plane_origin(c)]
    record = {"mode": "shared" if c.directions.origin is not None else "per-checkpoint",
              "origin": {"source": origin.source, "sha256": origin.sha256},
              "directions_sha256": flow.outputs["directions"].sha256, "grid": dataclasses.asdict(c.grid)}
    what = json.dumps([origin.sha256, record["directions_sha256"], record["grid"]], sort_keys=True, default=str)
    return {"plane": record, PLANE_ATTR: hashlib.sha256(what.encode()).hexdigest()[:16]}


def _in_root(flow: Flow, path: Path) -> str | None:
    """Shared outputs belong to their project root: a run never reuses another root's store."""
    return None if Path(path).is_relative_to(flow.stores) else f"{path} belongs to another project root"


def _checkpoint_identity(flow: Flow, out: Any) -> str:
    """Downstream stages depend on the checkpoint's content, not on where it was read from."""
    return tracking.stage_key("checkpoint", {"sha256": out.sha256, "model": flow.cfg.model}, (), VERSION)


def _plane_origin(cfg: PipelineConfig) -> str:
    """The stage whose checkpoint the plane goes through: ``origin`` on a shared plane, else θ0's."""
    return "origin" if cfg.directions.origin is not None else "checkpoint"


def _directions_inputs(flow: Flow) -> DirectionsInputs:
    """Hessian eigenvectors depend on the loss at θ0 too: their inputs name what it reads, so the key covers it."""
    ck = flow.outputs[_plane_origin(flow.cfg)].path
    if flow.cfg.directions.kind != "hessian":
        return DirectionsInputs(ck, flow.towards, trajectory=flow.trajectory)
    c = flow.cfg
    loss = {"adapters": c.adapters, "data": c.data, "metrics": c.metrics, "model_mode": c.compute.model_mode,
            "bn_batches": c.compute.bn_batches,
            "eigen": {k: getattr(c.curvature, k) for k in ("tol", "max_iter", "seed", "hvp")}}
    # same run: one Lanczos, not two (the curvature stage's are θ0's: not a shared plane's origin's)
    saved = getattr(flow.outputs.get("curvature"), "eigenvectors", None) if c.directions.origin is None else None
    return HessianDirectionsInputs(ck, flow.towards, loss=json.dumps(_plain(loss), sort_keys=True, default=str),
                                   eigenvectors=saved)


def _eigenvectors_wanted(cfg: Any) -> int:
    """The curvature stage saves the top eigenvectors when the directions stage will read them."""
    return int(cfg.grid.dims) if cfg.directions.kind == "hessian" and cfg.directions.origin is None else 0


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else (
        {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value)


STAGES: tuple[Stage, ...] = (
    Stage("checkpoint", ck_stage.checkpoint, ("model", "checkpoint"), (), inputs=lambda f: f.source,
          identity=_checkpoint_identity, intact=lambda f, out: ck_stage.intact(out)),
    Stage("curvature", cv_stage.curvature, ("model", "adapters", "data", "metrics", "curvature"), ("checkpoint",),
          enabled=lambda cfg: cfg.curvature.enabled,
          inputs=lambda f: CurvatureInputs(f.outputs["checkpoint"].path, str(f.cfg.compute.model_mode),
                                           f.cfg.compute.bn_batches, _eigenvectors_wanted(f.cfg)),
          place=lambda f, key: {"out_dir": f.stores / f"curvature-{key[:16]}"},
          intact=lambda f, out: _in_root(f, out.spectrum_json) or cv_stage.intact(out)),
    Stage("connectivity", cn_stage.connectivity, ("model", "adapters", "data", "metrics", "connectivity"),
          ("checkpoint",), enabled=lambda cfg: cfg.connectivity.enabled,
          inputs=lambda f: ConnectivityInputs(f.outputs["checkpoint"].path, f.extra["connectivity_towards"],
                                              str(f.cfg.compute.model_mode), f.cfg.compute.bn_batches),
          place=lambda f, key: {"out_dir": f.stores / f"connectivity-{key[:16]}"},
          intact=lambda f, out: _in_root(f, out.paths_json) or cn_stage.intact(out)),
    Stage("origin", ck_stage.checkpoint, ("model", "checkpoint"), (), inputs=lambda f: f.origin,
          enabled=lambda cfg: cfg.directions.origin is not None,
          identity=_checkpoint_identity, intact=lambda f, out: ck_stage.intact(out)),
    Stage("directions", dr_stage.directions, ("model", "directions", "grid"), lambda cfg: (_plane_origin(cfg),),
          inputs=_directions_inputs,
          place=lambda f, key: {"out_dir": f.stores / f"directions-{key[:16]}"},
          intact=lambda f, out: _in_root(f, out.path) or dr_stage.intact(out)),
    Stage("evaluate", ev_stage.evaluate, ("model", "adapters", "data", "metrics", "grid", "compute", "resume"),
          ("checkpoint", "directions"),
          inputs=_evaluate_inputs, intact=lambda f, out: _in_root(f, out.store) or ev_stage.intact(out)),
    Stage("aggregate", aggregate, ("summary",), ("evaluate",), inputs=lambda f: AggregateInputs(f.outputs["evaluate"].store)),
    Stage("report", report, ("plot",), ("aggregate",), enabled=lambda cfg: cfg.plot.enabled,
          inputs=lambda f: ReportInputs(f.outputs["evaluate"].store, Path(f.cfg.paths.output_dir))),
)


def run_pipeline(cfg: DictConfig, *, sweep_run_id: str | None = None, stages: tuple[Stage, ...] = STAGES) -> dict[str, Any]:
    """Run the stages up to ``stop_after`` under one parent run; return its id, the summary and the plots."""
    c = to_typed(cfg)
    check_config(c)  # before any run is opened or anything computed
    uri = tracking.configure(c.tracking.uri, request_timeout=c.tracking.request_timeout)
    exp_id = tracking.launched_experiment() or tracking.get_or_create_experiment(
        c.tracking.experiment, artifact_root=tracking.default_artifact_root(uri, Path(c.paths.artifacts_dir)))
    flow = Flow(c, checkpoint_inputs(c, uri), towards_paths(c, uri), stores_dir(c.paths.root_dir),
                trajectory=trajectory_paths(c, uri), origin=origin_inputs(c, uri),
                extra={"connectivity_towards": connectivity_towards(c, uri)})
    tags = {"landscapes.checkpoint": flow.source.source}
    if flow.source.training_run_id:
        tags["landscapes.training_run"] = flow.source.training_run_id
    started = time.perf_counter()
    step = training_step(flow.source.source)
    with tracking.start_pipeline_run(exp_id, c.tracking.run_name or run_title(c, flow.source.source), tags,
                                     parent_run_id=sweep_run_id) as run:
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "config.yaml")
        tracking.log_params(headline_params(c) | ({"epoch": step} if step is not None else {}))
        log_data_input(c, run.info.run_id)  # the runs list's Dataset column
        run_stages(stages, flow, parent_run_id=run.info.run_id, experiment_id=exp_id)
        record_outcome(flow, time.perf_counter() - started, sweep_run_id=sweep_run_id, step=step)
    return result_of(run.info.run_id, flow)
