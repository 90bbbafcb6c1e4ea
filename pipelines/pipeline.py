"""The driver: resolve the config, open the parent run, run the five stages as child runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

import landscapes
from landscapes.errors import CheckpointNotFoundError, ConfigurationError
from pipelines import builders, tracking
from pipelines.stages.aggregate import AggregateInputs, aggregate
from pipelines.stages.checkpoint import CheckpointInputs, CheckpointOutputs, checkpoint
from pipelines.stages.directions import DirectionsInputs, DirectionsOutputs, directions
from pipelines.stages.evaluate import EvaluateInputs, EvaluateOutputs, evaluate
from pipelines.stages.report import ReportInputs, report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SWEEP_RUN_FILE = "sweep_run_id"


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain, resolved Python data (Enums as their strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def run_pipeline(cfg: DictConfig, *, sweep_run_id: str | None = None) -> dict[str, Any]:
    """Run checkpoint → directions → evaluate → aggregate → report; return the summary."""
    c = resolve(cfg)
    check_config(c)  # before any run is opened or anything computed
    uri = tracking.configure(c["tracking"]["uri"])
    tracking.ensure_store(uri)
    exp_id = tracking.get_or_create_experiment(
        c["tracking"]["experiment"], artifact_root=tracking.default_artifact_root(uri, Path(c["paths"]["artifacts_dir"]))
    )
    ck_inputs = _checkpoint_inputs(c, uri)
    towards = tuple(
        _checkpoint_inputs(c, uri, source=t, key=f"directions.towards[{i}]").path
        for i, t in enumerate(c["directions"].get("towards") or [])
    )
    stores = Path(c["paths"]["root_dir"]) / "outputs" / "stores"
    out_dir = Path(c["paths"]["output_dir"])
    version = landscapes.__version__
    name = c["tracking"]["run_name"] or f"landscape {Path(ck_inputs.source).name}"
    reuse = c["tracking"]["reuse"]
    tags = {"landscapes.checkpoint": ck_inputs.source}
    if ck_inputs.training_run_id:
        tags["landscapes.training_run"] = ck_inputs.training_run_id
    started = time.perf_counter()
    with tracking.start_pipeline_run(exp_id, name, tags, parent_run_id=sweep_run_id) as run:
        parent = run.info.run_id
        mlflow.log_dict(c, "config.yaml")
        tracking.log_params(_headline_params(c))

        def stage(stage_name, fn, inputs, sections, upstream=()):
            key = tracking.stage_key(stage_name, {s: c[s] for s in sections} | {"inputs": _key_inputs(inputs)}, upstream, version)
            try:
                out = tracking.run_stage(
                    stage_name, fn, c, inputs, parent_run_id=parent, experiment_id=exp_id, key=key,
                    params={s: c[s] for s in sections}, reuse=reuse,
                )
            except Exception as err:
                err.add_note(f"in the {stage_name!r} stage of the pipeline (finished stages are kept and reused on re-run)")
                raise
            return out, key

        order = ("checkpoint", "directions", "evaluate", "aggregate", "report")
        last = order.index(c["stop_after"])
        ck, _ = stage("checkpoint", checkpoint, ck_inputs, ("model", "checkpoint"))
        if last == 0:
            return {"run_id": parent, "checkpoint": str(ck.path), "summary": {}, "plots": []}
        # downstream stages depend on the checkpoint's content, not on where it was read from
        ck_key = tracking.stage_key("checkpoint", {"sha256": ck.sha256, "model": c["model"]}, (), version)
        dr, dr_key = _directions_stage(stage, c, ck, towards, stores, ck_key, version)
        if last == 1:
            return {"run_id": parent, "directions": str(dr.path), "summary": {}, "plots": []}
        ev_sections = ("model", "data", "metrics", "grid")
        ev_key = tracking.stage_key("evaluate", {s: c[s] for s in ev_sections} | {"model_mode": c["compute"]["model_mode"]}, (ck_key, dr_key), version)
        ev_inputs = EvaluateInputs(
            checkpoint=ck.path, directions=dr.path, store=stores / f"landscape-{ev_key[:16]}" / "landscape.zarr",
            fingerprint=ev_key, provenance=_provenance(c, ck, dr),
        )
        ev, ev_key = stage("evaluate", evaluate, ev_inputs, ev_sections + ("compute",), (ck_key, dr_key))
        if last == 2:
            return {"run_id": parent, "store": str(ev.store), "summary": {}, "plots": []}
        ag, ag_key = stage("aggregate", aggregate, AggregateInputs(ev.store), ("summary",), (ev_key,))
        plots: tuple[Path, ...] = ()
        if c["plot"]["enabled"] and last == 4:
            rp, _ = stage("report", report, ReportInputs(ev.store, out_dir), ("plot",), (ag_key,))
            plots = rp.plots
        mlflow.set_tags({
            "landscapes.checkpoint_sha256": ck.sha256,
            "landscapes.directions": dr_key[:16],
            "landscapes.store": str(ev.store),
            "landscapes.grid": "x".join(str(n) for n in _grid_shape(ev)),
        })
        mlflow.log_metrics(ag.metrics | {"pipeline_seconds": time.perf_counter() - started})
        for p in plots:
            if p.suffix == ".png":
                mlflow.log_artifact(str(p), artifact_path="plots")
    return {"run_id": parent, "store": str(ev.store), "summary": ag.summary, "plots": [str(p) for p in plots]}


def check_config(c: dict[str, Any]) -> None:
    """Refuse config mistakes before any stage runs (the grid, data, device, directions)."""
    axes = builders.grid_axes(c["grid"])
    builders.check_data_config(c["data"])
    builders.as_device(c["compute"]["device"])
    d = c["directions"]
    if d["kind"] == "checkpoints" and len(d.get("towards") or []) != len(axes):
        n = len(axes)
        raise ConfigurationError(
            f"directions.towards has {len(d.get('towards') or [])} checkpoint(s) but grid.dims={n}; give {n} "
            f"checkpoint(s) to move towards (directions.towards=[a.pt{', b.pt' if n == 2 else ''}])."
        )


def _directions_stage(stage, c, ck, towards, stores, ck_key, version):
    sections = ("model", "directions", "grid")
    key = tracking.stage_key("directions", {s: c[s] for s in sections}, (ck_key,), version)
    inputs = DirectionsInputs(ck.path, towards, stores / f"directions-{key[:16]}")
    return stage("directions", directions, inputs, sections, (ck_key,))


def _grid_shape(ev: EvaluateOutputs) -> tuple[int, ...]:
    from landscapes.store import LandscapeStore

    return tuple(LandscapeStore.open(ev.store, mode="r").shape)


def _key_inputs(inputs: Any) -> dict[str, Any]:
    """What of a stage's inputs enters its key: file identities, not where outputs go."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(inputs):
        v = getattr(inputs, f.name)
        if f.name in ("out_dir", "store", "provenance"):
            continue
        out[f.name] = [str(p) for p in v] if isinstance(v, tuple) else str(v)
    return out


def _headline_params(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": c["model"].get("_target_"), "checkpoint.path": c["checkpoint"]["path"] or "demo (latest)",
        "directions": c["directions"], "grid": c["grid"], "data": {"name": c["data"]["name"], "limit": c["data"]["limit"],
        "batch_size": c["data"]["batch_size"]}, "compute": {k: c["compute"][k] for k in ("device", "strategy", "model_mode", "backend")},
    }


def _provenance(c: dict[str, Any], ck: CheckpointOutputs, dr: DirectionsOutputs) -> dict[str, Any]:
    return {
        "checkpoint": {"source": ck.source, "path": str(ck.path), "sha256": ck.sha256, "parameter_count": ck.parameter_count,
                       "training_run_id": ck.training_run_id},
        "model": c["model"], "data": c["data"], "metrics_config": c["metrics"], "grid": c["grid"],
        "directions_config": c["directions"], "model_mode": c["compute"]["model_mode"],
        "versions": {"landscapes": landscapes.__version__, "torch": torch.__version__, "mlflow": mlflow.__version__},
    }


def _checkpoint_inputs(c: dict[str, Any], uri: str, source: str | None = None, key: str = "checkpoint.path") -> CheckpointInputs:
    """A local file for the configured checkpoint: a path, an MLflow URI, or the demo's latest."""
    source = source if source is not None else c["checkpoint"]["path"]
    if source is None:
        return _demo_checkpoint(c, uri)
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return _download(source, key)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(c["paths"]["root_dir"]) / path
    if not path.exists():
        demo = ", or leave checkpoint.path=null for the demo model" if key == "checkpoint.path" else ""
        raise CheckpointNotFoundError(
            f"{key}={source!r}: no such file ({path}); give a .pt/.pth/.safetensors/.ckpt "
            f"file or an MLflow runs:/ or models:/ URI{demo}."
        )
    return CheckpointInputs(path=path.resolve(), source=str(source), training_run_id=_training_run_of(path))


def _training_run_of(path: Path) -> str | None:
    marker = path.parent / "mlflow_run_id"
    return marker.read_text().strip() if marker.exists() else None


def _download(uri: str, key: str = "checkpoint.path") -> CheckpointInputs:
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:
        raise CheckpointNotFoundError(
            f"{key}={uri!r}: MLflow cannot download it ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "check the run id / model name and the tracking URI."
        ) from err
    if local.is_dir():
        files = [p for p in local.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")]
        if len(files) != 1:
            raise ConfigurationError(
                f"{key}={uri!r} is a folder with {len(files)} checkpoint files; point at one file."
            )
        local = files[0]
    run_id = uri.split("/")[1] if uri.startswith("runs:/") else None
    return CheckpointInputs(path=local, source=uri, training_run_id=run_id)


def _demo_checkpoint(c: dict[str, Any], uri: str) -> CheckpointInputs:
    from pipelines.train import train

    ckpt_dir = Path(c["paths"]["demo_dir"]) / "checkpoints"
    found = sorted(ckpt_dir.glob("epoch_*.pt"))
    if not found:
        print(f"No checkpoint configured and no demo checkpoint in {ckpt_dir}: training the demo model first.")
        train(demo_train_config(c, uri))
        found = sorted(ckpt_dir.glob("epoch_*.pt"))
    return CheckpointInputs(path=found[-1].resolve(), source=str(found[-1]), training_run_id=_training_run_of(found[-1]))


def demo_train_config(c: dict[str, Any], uri: str) -> dict[str, Any]:
    opts = dict(c.get("train") or {})
    opts.setdefault("experiment", c["tracking"]["experiment"])
    return {"out_dir": Path(c["paths"]["demo_dir"]), "tracking_uri": uri, **opts}


def project_root() -> Path:
    return Path(os.environ.get("LANDSCAPES_ROOT", PROJECT_ROOT))
