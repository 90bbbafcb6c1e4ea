"""The whole pipeline in-process on the trained demo: runs, params, metrics, artifacts, the store.

Each test composes ``conf/`` with Hydra's compose API (``debug=default``: 5x5 grid, 128
samples) and calls `pipelines.pipeline.run_pipeline` against a private copy of the demo
project (its own sqlite store, checkpoints and Zarr stores).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from mlflow.entities import Run

from landscapes.checkpoints import load_into, load_state_dict
from pipelines.demo import DemoMLP, load_digits_tensors
from tests.integration.conftest import REPO, Project

STAGES = ("checkpoint", "directions", "evaluate", "aggregate", "report")
SUMMARY_METRICS = (
    "loss_at_theta0", "loss_min", "loss_max", "accuracy_at_theta0", "accuracy_min", "accuracy_max",
    "flat_area_tol0.1", "loss_nan_count", "points",
)  # no sharpness_r0.1: θ0 is excluded and no other point of the debug grid lies within 0.1 (absent, not 0.0)
# one pipeline run of the module: non-square plane, the whole data set (as the training run)
FIRST = ("debug=default", "grid.steps=[5,3]", "data.limit=null")
REL = 1e-5  # landscape value at θ0 vs the training run's own measurement


def demo_loss(checkpoint: Path, limit: int | None = 128) -> tuple[float, float]:
    """Cross-entropy and accuracy of a demo checkpoint on the first ``limit`` digits, directly."""
    x, y = load_digits_tensors()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    model = load_into(DemoMLP(), load_state_dict(checkpoint)).eval()
    with torch.no_grad():
        logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def first(module_project: Project) -> tuple[Project, dict, Run, dict[str, Run]]:
    """One finished pipeline run: (project, result, parent run, stage runs by name)."""
    result = module_project.run(*FIRST)
    parent = module_project.client.get_run(result["run_id"])
    return module_project, result, parent, module_project.stages(parent.info.run_id)


# --- one run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_parent_and_five_stage_runs_finish(first) -> None:
    project, result, parent, stages = first
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["landscapes.kind"] == "pipeline"
    assert "mlflow.parentRunId" not in parent.data.tags  # not part of a sweep
    assert sorted(stages) == sorted(STAGES)
    for name, run in stages.items():
        assert run.info.status == "FINISHED", name
        assert run.info.run_name == name
        assert run.data.tags["landscapes.kind"] == "stage"
        assert re.fullmatch(r"[0-9a-f]{64}", run.data.tags["landscapes.stage_key"]), name
        assert parent.data.tags[f"landscapes.stage_run.{name}"] == run.info.run_id
    # stages ran in pipeline order
    starts = [stages[name].info.start_time for name in STAGES]
    assert starts == sorted(starts)


@pytest.mark.slow
def test_params(first) -> None:
    _, _, parent, stages = first
    p = parent.data.params
    assert p["grid.steps"] == "[5,3]"
    assert p["grid.dims"] == "2"
    assert p["grid.range"] == "[-1.0,1.0]"
    assert p["data.limit"] == "None"
    assert p["checkpoint.path"] == "demo (latest)"
    assert p["model"] == "pipelines.demo.DemoMLP"
    assert p["directions.kind"] == "random"
    assert p["directions.normalization"] == "filter"
    assert p["compute.model_mode"] == "eval"
    # each stage logs the config sections its key depends on
    assert stages["checkpoint"].data.params["model.hidden"] == "[128,128]"
    assert stages["checkpoint"].data.params["checkpoint.trust_pickle"] == "False"
    assert stages["directions"].data.params["directions.seed"] == "0"
    assert stages["evaluate"].data.params["grid.steps"] == "[5,3]"
    assert stages["evaluate"].data.params["compute.device"] == "auto"
    assert stages["aggregate"].data.params["summary.radius"] == "0.1"
    assert stages["report"].data.params["plot.html"] == "False"


@pytest.mark.slow
def test_figures_on_the_pipeline_run_measurements_on_the_stage_runs(first) -> None:
    """The landscape's figures are logged once, on the pipeline run; each stage run logs what it measured itself."""
    _, result, parent, stages = first
    figures = parent.data.metrics
    for key in SUMMARY_METRICS:
        assert np.isfinite(figures[key]), key
        assert result["summary"][key] == pytest.approx(figures[key]), key
    assert figures["pipeline_seconds"] > 0
    assert figures["points"] == 15
    assert figures["loss_nan_count"] == 0
    assert figures["loss_min"] <= figures["loss_at_theta0"] <= figures["loss_max"]
    assert 0 <= figures["accuracy_min"] <= figures["accuracy_at_theta0"] <= figures["accuracy_max"] <= 1
    # the same figures as the store's own summary (written by the aggregate stage)
    summary = json.loads(stages["aggregate"].data.tags["landscapes.outputs"])["summary"]
    assert {k: summary[k] for k in SUMMARY_METRICS} == {k: figures[k] for k in SUMMARY_METRICS}

    own = {name: set(run.data.metrics) for name, run in stages.items()}
    assert own["aggregate"] == {"aggregate_seconds"} and stages["aggregate"].data.metrics["aggregate_seconds"] > 0
    assert stages["checkpoint"].data.metrics["parameter_count"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert stages["directions"].data.metrics["direction_0_norm"] > 0
    assert -1 <= stages["directions"].data.metrics["direction_cosine"] <= 1
    ev = stages["evaluate"].data.metrics
    assert ev["tiles_computed"] >= 1 and ev["tiles_reused"] == 0
    assert ev["points_computed"] == 15 and ev["evaluate_seconds"] > 0
    assert ev["points_per_second"] == pytest.approx(15 / ev["evaluate_seconds"])
    assert not set(figures) & set().union(*own.values())  # each figure in one place


@pytest.mark.slow
def test_artifacts(first, tmp_path: Path) -> None:
    project, result, parent, stages = first
    pid = parent.info.run_id
    top = project.artifacts(pid)
    assert "config.yaml" in top and "plots" in top
    config = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=pid, artifact_path="config.yaml", dst_path=str(tmp_path / "cfg"), tracking_uri=project.uri)).read_text())
    assert config["grid"]["steps"] == [5, 3]
    assert config["paths"]["root_dir"] == str(project.root)

    plots = project.artifacts(pid, "plots")
    assert plots and all(p.endswith(".png") for p in plots)  # debug: plot.html=false
    names = {Path(p).name for p in plots}
    assert {"loss_contour_log.png", "accuracy_contour.png"} <= names
    assert names == {Path(p).name for p in result["plots"]}

    for name, run in stages.items():
        files = project.artifacts(run.info.run_id)
        assert "outputs.json" in files, name
        outputs = json.loads(run.data.tags["landscapes.outputs"])
        assert isinstance(outputs, dict), name
    assert names == {Path(p).name for p in project.artifacts(stages["report"].info.run_id, "plots")}
    store_files = project.artifacts(stages["aggregate"].info.run_id, "landscape.zarr")
    assert "landscape.zarr/zarr.json" in store_files and "landscape.zarr/loss" in store_files

    # the logged copy of the store is itself a complete landscape
    copy = mlflow.artifacts.download_artifacts(
        run_id=stages["aggregate"].info.run_id, artifact_path="landscape.zarr", dst_path=str(tmp_path / "dl"),
        tracking_uri=project.uri,
    )
    with xr.open_zarr(copy) as logged, xr.open_zarr(result["store"]) as local:
        np.testing.assert_array_equal(logged["loss"].values, local["loss"].values)


@pytest.mark.slow
def test_store_matches_configured_grid(first) -> None:
    project, result, parent, stages = first
    store = Path(result["store"])
    assert store.is_relative_to(project.root / "outputs" / "stores")
    assert parent.data.tags["landscapes.store"] == str(store)
    assert parent.data.tags["landscapes.grid"] == "5x3"
    with xr.open_zarr(store) as ds:
        assert ds["loss"].dims == ("x", "y") and ds["accuracy"].dims == ("x", "y")
        assert ds["loss"].shape == (5, 3)
        np.testing.assert_array_equal(ds["x"].values, [-1.0, -0.5, 0.0, 0.5, 1.0])
        np.testing.assert_array_equal(ds["y"].values, [-1.0, 0.0, 1.0])
        loss, acc = ds["loss"].values, ds["accuracy"].values
        assert np.isfinite(loss).all() and np.isfinite(acc).all()
        assert ((acc >= 0) & (acc <= 1)).all()
        assert loss[2, 1] == parent.data.metrics["loss_at_theta0"]
        assert loss.min() == parent.data.metrics["loss_min"]
        # the store is named by its fingerprint, so a rerun of this configuration reopens it
        assert re.fullmatch(r"[0-9a-f]{64}", ds.attrs["fingerprint"])
        assert store.parent.name == f"landscape-{ds.attrs['fingerprint'][:16]}"
        assert ds.attrs["directions"]["kind"] == "random"
        assert ds.attrs["summary"]["loss_at_theta0"] == parent.data.metrics["loss_at_theta0"]


@pytest.mark.slow
def test_the_run_describes_itself(first) -> None:
    """The description atop the run's MLflow page: the headline numbers, grid, directions and store."""
    _, result, parent, _ = first
    m = parent.data.metrics
    lines = parent.data.tags["mlflow.note.content"].splitlines()
    assert lines[0] == (f"**{Path(result['checkpoint']).stem}** on digits: loss at θ0 **{m['loss_at_theta0']:.4g}**, "
                        f"accuracy at θ0 **{m['accuracy_at_theta0']:.2%}**, lowest loss on the grid **{m['loss_min']:.4g}**")
    assert lines[1] == "- grid: 5 × 3 points on [-1, 1] × [-1, 1]; directions: random, filter-normalized, seed 0"
    assert lines[2] == f"- flat area (tol 0.1) **{m['flat_area_tol0.1']:.2%}**"  # no sharpness: no neighbour within 0.1
    assert lines[3] == f"- store: `{result['store']}`"


@pytest.mark.slow
def test_theta0_matches_training_run(first) -> None:
    project, _, parent, stages = first
    client = project.client
    train = client.get_run(project.train_run_id)
    assert train.data.tags["landscapes.kind"] == "train"
    final = max(client.get_metric_history(project.train_run_id, "train_loss"), key=lambda m: m.step)
    final_acc = max(client.get_metric_history(project.train_run_id, "train_accuracy"), key=lambda m: m.step)
    assert final.step == 4
    assert parent.data.metrics["loss_at_theta0"] == pytest.approx(final.value, rel=REL)
    assert parent.data.metrics["accuracy_at_theta0"] == pytest.approx(final_acc.value, rel=REL)
    # the tags link the landscape to the checkpoint file and to the run that trained it
    ckpt = project.checkpoint(4)
    assert parent.data.tags["landscapes.training_run"] == project.train_run_id
    assert Path(parent.data.tags["landscapes.checkpoint"]) == ckpt
    assert parent.data.tags["landscapes.checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    outputs = json.loads(stages["checkpoint"].data.tags["landscapes.outputs"])
    assert outputs["training_run_id"] == project.train_run_id
    assert outputs["sha256"] == parent.data.tags["landscapes.checkpoint_sha256"]


@pytest.mark.slow
def test_identical_rerun_reuses_every_stage(first) -> None:
    project, _, parent, stages = first
    again = project.run(*FIRST)
    rerun = project.client.get_run(again["run_id"])
    assert rerun.info.run_id != parent.info.run_id
    assert rerun.info.status == "FINISHED"
    for name in STAGES:
        assert rerun.data.tags[f"landscapes.stage_run.{name}"] == stages[name].info.run_id, name
    assert project.children(rerun.info.run_id) == []  # nothing ran again
    key = stages["evaluate"].data.tags["landscapes.stage_key"]
    assert len(project.search(f"tags.`landscapes.stage_key` = '{key}'")) == 1
    assert again["store"] == first[1]["store"]
    assert rerun.data.metrics["loss_at_theta0"] == parent.data.metrics["loss_at_theta0"]


@pytest.mark.slow
def test_the_evaluation_data_is_a_dataset_input(first) -> None:
    """The runs list's Dataset column: the data's name and fingerprint, on the pipeline run and its evaluate run."""
    project, _, parent, stages = first

    def inputs(run_id: str) -> list[tuple[str, str, str, str, dict]]:
        return [(d.dataset.name, d.dataset.digest, d.dataset.source_type, {t.key: t.value for t in d.tags}["mlflow.data.context"],
                 json.loads(d.dataset.source)) for d in project.client.get_run(run_id).inputs.dataset_inputs]

    [(name, digest, kind, context, source)] = inputs(parent.info.run_id)
    assert (name, kind, context) == ("digits", "code", "evaluation")
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert json.loads(source["tags"]["dataset"]) == {"_target_": "pipelines.demo.digits_dataset"}
    assert source["tags"]["limit"] == "None"  # FIRST: the whole data set
    assert inputs(stages["evaluate"].info.run_id) == inputs(parent.info.run_id)
    assert all(inputs(stages[s].info.run_id) == [] for s in STAGES if s != "evaluate")

    again = project.run(*FIRST)  # every stage reused: the same digest, no second input on the reused evaluate run
    assert inputs(again["run_id"]) == inputs(parent.info.run_id)
    assert len(inputs(stages["evaluate"].info.run_id)) == 1
    fewer = project.run("debug=default")  # the first 128 digits: other data, another digest
    [(name2, digest2, _, _, source2)] = inputs(fewer["run_id"])
    assert name2 == "digits" and digest2 != digest and source2["tags"]["limit"] == "128"


# --- other shapes of run -------------------------------------------------------------------


@pytest.mark.slow
def test_stop_after_directions_then_resume(project: Project) -> None:
    early = project.run("debug=default", "stop_after=directions")
    parent = project.client.get_run(early["run_id"])
    assert parent.info.status == "FINISHED"
    stages = project.stages(parent.info.run_id)
    assert sorted(stages) == ["checkpoint", "directions"]
    assert Path(early["directions"]).name == "directions.zarr" and Path(early["directions"]).exists()
    assert "store" not in early and "landscapes.store" not in parent.data.tags
    assert not list((project.root / "outputs" / "stores").glob("landscape-*"))

    full = project.run("debug=default")
    rest = project.client.get_run(full["run_id"])
    assert rest.info.status == "FINISHED"
    assert sorted(project.stages(rest.info.run_id)) == ["aggregate", "evaluate", "report"]
    for name in ("checkpoint", "directions"):
        assert rest.data.tags[f"landscapes.stage_run.{name}"] == stages[name].info.run_id


@pytest.mark.slow
def test_line(project: Project) -> None:
    result = project.run("debug=default", "grid=line", "grid.steps=7")
    parent = project.client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["grid.dims"] == "1"
    assert parent.data.tags["landscapes.grid"] == "7"
    with xr.open_zarr(result["store"]) as ds:
        assert ds["loss"].dims == ("x",) and ds["loss"].shape == (7,)
        assert ds["x"].values[3] == 0.0
        loss = ds["loss"].values
    assert np.isfinite(loss).all()
    assert loss[3] == parent.data.metrics["loss_at_theta0"]
    assert loss[3] == pytest.approx(demo_loss(project.checkpoint(4))[0], rel=REL)
    assert sorted(project.stages(parent.info.run_id)) == sorted(STAGES)
    assert any(Path(p).name.startswith("loss") for p in result["plots"])


def test_html_pages_share_one_plotly_file_on_request(project: Project) -> None:
    result = project.run("debug=default", "grid=line", "grid.steps=5", "plot.html=true", "plot.metrics=[loss]",
                         "plot.plotlyjs=directory")
    report = project.stages(result["run_id"])["report"]
    files = project.artifacts(report.info.run_id, "plots")
    assert "plots/plotly.min.js" in files and "plots/loss_log.html" in files
    page = next(Path(p) for p in result["plots"] if p.endswith("loss_log.html"))
    assert page.stat().st_size < 200_000 and 'src="plotly.min.js"' in page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_1d_interpolation(project: Project) -> None:
    start, end = project.checkpoint(4), project.checkpoint(0)
    result = project.run(
        "experiment=1d_interpolation", f"checkpoint.path={start}", f"directions.towards=[{end}]",
        "debug=default", "grid.steps=7",
    )
    parent = project.client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["directions.kind"] == "checkpoints"
    with xr.open_zarr(result["store"]) as ds:
        np.testing.assert_array_equal(ds["x"].values, [-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
        loss = ds["loss"].values
        assert ds.attrs["directions"]["towards"] == [str(end)]
    # the line passes through both checkpoints: x=0 is the start, x=1 the end
    assert loss[1] == pytest.approx(demo_loss(start)[0], rel=REL)
    assert loss[5] == pytest.approx(demo_loss(end)[0], rel=1e-4)
    assert np.isfinite(loss).all()


@pytest.mark.slow
def test_2d_three_checkpoints(project: Project) -> None:
    c0, c1, c2 = project.checkpoint(4), project.checkpoint(0), project.checkpoint(2)
    result = project.run(
        "experiment=2d_three_checkpoints", f"checkpoint.path={c0}", f"directions.towards=[{c1},{c2}]",
        "debug=default", "grid.steps=3", "grid.range=[0.0,1.0]",
    )
    parent = project.client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    stages = project.stages(parent.info.run_id)
    assert "direction_cosine" in stages["directions"].data.metrics
    with xr.open_zarr(result["store"]) as ds:
        assert ds["loss"].shape == (3, 3)
        loss = ds["loss"].values
    # the plane holds the three checkpoints at (0, 0), (1, 0) and (0, 1)
    assert loss[0, 0] == pytest.approx(demo_loss(c0)[0], rel=REL)
    assert loss[2, 0] == pytest.approx(demo_loss(c1)[0], rel=1e-4)
    assert loss[0, 2] == pytest.approx(demo_loss(c2)[0], rel=1e-4)


# --- the documented commands compose -------------------------------------------------------


def _documented_commands() -> list[pytest.param]:
    """Every single-run ``python -m pipelines.run ...`` example in README.md and pipelines/run/__init__.py."""
    found = []
    for source in (REPO / "README.md", REPO / "pipelines" / "run" / "__init__.py"):
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("python -m pipelines.run"):
                continue
            args = shlex.split(line)[3:]
            if "-m" in args or "--multirun" in args:
                continue  # sweeps: tests/integration/test_sweep.py
            found.append(pytest.param(args, id=f"{source.name}: {' '.join(args)}"))
    return found


@pytest.mark.parametrize("overrides", _documented_commands())
def test_documented_command_composes(overrides: list[str], hydra_configs: None, tmp_path: Path) -> None:
    project = Project(root=tmp_path, train_run_id="")
    cfg = project.compose(*overrides)
    assert cfg.grid.dims in (1, 2)


@pytest.mark.parametrize("preset", ["1d_interpolation", "2d_three_checkpoints"])
def test_checkpoint_presets_hold_every_checkpoint_on_the_grid(preset: str, hydra_configs: None, tmp_path: Path) -> None:
    """θ0 at 0 and the other checkpoints at 1, exactly: the figures at θ0 and the marked ends are real grid values."""
    from pipelines.builders import grid_axes
    from pipelines.config import to_typed

    project = Project(root=tmp_path, train_run_id="")
    mp = project.environment()
    try:
        cfg = to_typed(project.compose(f"experiment={preset}", "directions.towards=[a.pt,b.pt]"))
    finally:
        mp.undo()
    for axis in grid_axes(cfg.grid):
        assert 0.0 in axis.tolist() and 1.0 in axis.tolist(), axis
