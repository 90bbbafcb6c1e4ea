"""How the pipeline fails: the message of every configuration and checkpoint mistake, and that
a failure keeps whatever was computed before it.

Table-driven: each row names the overrides, the exception and a pattern its message must
match (the key with its value, what was expected, the fix).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ValidationError

from landscapes.checkpoints import load_into, load_state_dict
from landscapes.errors import (
    AdapterError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    MetricValueError,
    StoreError,
)
from landscapes.store import LandscapeStore
from pipelines.builders import build_model
from pipelines.demo import DemoMLP
from pipelines.stages.directions import DirectionsInputs, directions
from pipelines.stages.evaluate import EvaluateInputs, evaluate
from tests.integration.conftest import Project
from tests.integration.own_models import SEARCHPATH

CUDA = torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(CUDA, reason="a CUDA device is present: compute.device=cuda is valid here")


# --- rejected when Hydra composes the config -----------------------------------------------

COMPOSE_ERRORS = [
    pytest.param(
        ["directions.normalization=filters"], ConfigCompositionException, r"directions\.normalization=filters",
        ValidationError, r"Invalid value 'filters', expected one of \[filter, layer, model, none\](?s:.*)full_key: directions\.normalization",
        id="unknown-normalization",
    ),
    pytest.param(
        ["grid.stepz=3"], ConfigCompositionException, r"Could not override 'grid\.stepz'",
        ConfigAttributeError, r"Key 'stepz' not in 'GridConfig'(?s:.*)full_key: grid\.stepz",
        id="unknown-key",
    ),
    pytest.param(
        ["stop_after=evaluation"], ConfigCompositionException, r"stop_after=evaluation",
        ValidationError, r"expected one of \[checkpoint, curvature, connectivity, directions, evaluate, aggregate, report\]",
        id="unknown-stage",
    ),
    pytest.param(
        ["compute.device=tpu"], ConfigCompositionException, r"compute\.device=tpu",
        ValidationError, r"Invalid value 'tpu', expected one of \[auto, cpu, cuda\]",
        id="unknown-device",
    ),
    pytest.param(
        ["checkpoint.trust_pickle=maybe"], ConfigCompositionException, r"checkpoint\.trust_pickle=maybe",
        ValidationError, r"Value 'maybe' is not a valid bool(?s:.*)full_key: checkpoint\.trust_pickle",
        id="not-a-bool",
    ),
    pytest.param(
        ["directions.seed=1.5"], ConfigCompositionException, r"directions\.seed=1\.5",
        ValidationError, r"could not be converted to Integer(?s:.*)full_key: directions\.seed",
        id="float-seed",
    ),
    pytest.param(
        ["compute.model_mode=recompute"], ConfigCompositionException, r"compute\.model_mode=recompute",
        ValidationError, r"Invalid value 'recompute', expected one of \[eval, train, recompute_bn, as_is\]",
        id="unknown-model-mode",
    ),
    pytest.param(
        ["+metrics.extra._target_=my_pkg.sharpness"], ConfigCompositionException,
        r"Error merging override \+metrics\.extra\._target_=my_pkg\.sharpness",
        ValidationError, r"Cannot assign str to Dict\[str, Any\]",
        id="custom-metric-without-a-name",
    ),
    pytest.param(
        ["directions=checkpoint"], MissingConfigException, r"Could not find 'directions/checkpoint'(?s:.*)checkpoints",
        None, None,
        id="unknown-group-option",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "match", "cause", "cause_match"), COMPOSE_ERRORS)
def test_compose_errors(overrides, error, match, cause, cause_match, hydra_configs: None, tmp_path: Path) -> None:
    project = Project(root=tmp_path, train_run_id="")
    with pytest.raises(error, match=match) as info:
        project.compose("debug=default", *overrides)
    if cause is not None:  # OmegaConf's error, chained by Hydra, names the key
        assert isinstance(info.value.__cause__, cause)
        assert re.search(cause_match, str(info.value.__cause__)), str(info.value.__cause__)


# --- rejected when the pipeline runs -------------------------------------------------------


def _pickled_module(project: Project) -> Path:
    """A whole nn.Module pickled with torch.save (not a state dict)."""
    path = project.root / "full_module.pt"
    if not path.exists():
        torch.save(load_into(DemoMLP(), load_state_dict(project.checkpoint(4))), path)
    return path


def _own_checkpoint(project: Project, name: str, *overrides: str) -> Path:
    """The state dict of the model that ``overrides`` configure (seed 0), saved once per root."""
    path = project.root / name
    if not path.exists():
        torch.manual_seed(0)
        torch.save(build_model(project.resolved(*overrides).model).state_dict(), path)
    return path


def _own(project: Project, model: str, data: str) -> list[str]:
    """A model and data of the user's config group (tests/integration/own_models/conf), with a checkpoint."""
    overrides = [SEARCHPATH, f"model={model}", f"data={data}"]
    return [*overrides, f"checkpoint.path={_own_checkpoint(project, f'{model}.pt', *overrides)}"]


def _pt2_model(project: Project) -> str:
    """The demo MLP logged with mlflow.pytorch.log_model in MLflow 3's default format (pt2)."""
    marker = project.root / "pt2_uri"
    if marker.exists():
        return marker.read_text()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(project.uri)
    try:
        with mlflow.start_run(experiment_id=project.experiment_id) as run:
            mlflow.pytorch.log_model(
                load_into(DemoMLP(), load_state_dict(project.checkpoint(4))), name="model",
                serialization_format="pt2", input_example=np.zeros((2, 64), dtype=np.float32),
                pip_requirements=["torch"],
            )
    finally:
        mlflow.set_tracking_uri(previous)
    marker.write_text(f"runs:/{run.info.run_id}/model")
    return marker.read_text()


Overrides = Callable[[Project], list[str]]

def narrow_digits():
    """The digits with one feature dropped: 63 columns for a model that takes 64."""
    from torch.utils.data import TensorDataset

    from pipelines.demo import load_digits_tensors

    x, y = load_digits_tensors()
    return TensorDataset(x[:, :63], y)


RUN_ERRORS = [
    pytest.param(
        lambda p: ["data.dataset._target_=tests.integration.test_pipeline_errors.narrow_digits"], ConfigurationError,
        r"data: DemoMLP cannot take a batch of the data \(inputs \(4, 63\) float32, targets \(4,\) int64\): "
        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied.*Check data\.dataset",
        id="data-of-another-width",
    ),
    pytest.param(
        lambda p: ["data.dataset._target_=pipelines.demo.load_digits_tensors"],
        ConfigurationError, r"data\.dataset\._target_='pipelines\.demo\.load_digits_tensors' returned a tuple, not a torch Dataset",
        id="dataset-not-a-dataset",
    ),
    pytest.param(
        lambda p: ["compute.memory_budget=0"], ConfigurationError,
        r"compute\.memory_budget=0: expected a positive integer", id="zero-memory-budget",
    ),
    pytest.param(
        lambda p: ["compute.memory_budget=1"], ConfigurationError,
        r"compute\.memory_budget=1: one grid point of DemoMLP needs about .* set compute\.memory_budget to at least \d+ bytes",
        id="memory-budget-below-a-point",
    ),
    pytest.param(
        lambda p: [f"checkpoint.path={p.root / 'missing.pt'}"], CheckpointNotFoundError,
        r"checkpoint\.path='.*/missing\.pt': no such file .*leave checkpoint\.path=null",
        id="missing-checkpoint",
    ),
    pytest.param(
        lambda p: ["checkpoint.path=nope.pt"], CheckpointNotFoundError,
        r"checkpoint\.path='nope\.pt': no such file \(.*/root/nope\.pt\)",  # relative to paths.root_dir
        id="missing-relative-checkpoint",
    ),
    pytest.param(
        lambda p: ["model.hidden=[32]"], CheckpointError,
        r"does not fit DemoMLP(?s:.*)shape mismatch(?s:.*)net\.0\.weight: checkpoint \(128, 64\) vs model \(32, 64\)"
        r"(?s:.*)Check that the model config",
        id="other-architecture",
    ),
    pytest.param(
        lambda p: [f"checkpoint.path={_pickled_module(p)}"], CheckpointError,
        r"not a plain state dict(?s:.*)checkpoint\.trust_pickle=true",
        id="pickled-module",
    ),
    pytest.param(
        lambda p: ["grid.steps=0"], ConfigurationError,
        r"grid\.steps=0 \(axis 0\): an axis needs at least one point; set grid\.steps to a positive integer",
        id="zero-steps",
    ),
    pytest.param(
        lambda p: ["grid.steps=[5,0]"], ConfigurationError, r"grid\.steps=0 \(axis 1\)",
        id="zero-steps-second-axis",
    ),
    pytest.param(
        lambda p: ["grid.steps=[5,5,5]"], ConfigurationError, r"grid: dims=2 but steps=\[5, 5, 5\]",
        id="steps-for-three-axes",
    ),
    pytest.param(
        lambda p: ["grid.range=[0,inf]"], ConfigurationError, r"grid\.range=\[0, inf\] \(axis 0\)(?s:.*)finite",
        id="infinite-range",
    ),
    pytest.param(
        lambda p: ["grid.range=[nan,1.0]"], ConfigurationError, r"grid\.range=\[nan, 1\.0\] \(axis 0\)(?s:.*)finite",
        id="nan-range",
    ),
    pytest.param(
        lambda p: ["data.limit=0"], ConfigurationError, r"data\.limit=0: give a positive integer or null",
        id="zero-samples",
    ),
    pytest.param(
        lambda p: ["compute.device=cuda"], ConfigurationError,
        r"compute\.device=cuda but no CUDA device is available; use compute\.device=auto or cpu",
        id="cuda-without-gpu", marks=needs_no_cuda,
    ),
    pytest.param(
        lambda p: ["experiment=2d_three_checkpoints", f"directions.towards=[{p.checkpoint(0)}]"], ConfigurationError,
        r"directions\.towards has 1 checkpoint\(s\) but grid\.dims=2; give 2 checkpoint\(s\)",
        id="plane-with-one-towards",
    ),
    pytest.param(
        lambda p: ["experiment=1d_interpolation", f"directions.towards=[{p.checkpoint(0)},{p.checkpoint(2)}]"],
        ConfigurationError, r"directions\.towards has 2 checkpoint\(s\) but grid\.dims=1; give 1 checkpoint\(s\)",
        id="line-with-two-towards",
    ),
    pytest.param(
        lambda p: ["experiment=1d_interpolation"], ConfigurationError,
        r"directions\.towards has 0 checkpoint\(s\) but grid\.dims=1",
        id="line-without-towards",
    ),
    pytest.param(
        lambda p: ["experiment=1d_interpolation", f"directions.towards=[{p.root / 'gone.pt'}]"], CheckpointNotFoundError,
        r"directions\.towards(?s:.*)gone\.pt': no such file",  # the key that holds the path, not checkpoint.path
        id="missing-towards-checkpoint",
    ),
    pytest.param(
        lambda p: ["model._target_=pipelines.demo.DemoCNN"], ConfigurationError,
        r"^model: cannot instantiate 'pipelines\.demo\.DemoCNN': TypeError: DemoCNN\.__init__\(\) got an unexpected "
        r"keyword argument 'in_features'; check model\._target_ and its keyword arguments \(use model=custom to "
        r"start from no kwargs\)\.",
        id="model-with-the-demo-kwargs",
    ),
    pytest.param(
        lambda p: ["model=custom", "model._target_=my_pkg.Net"], ConfigurationError,
        r"^model: cannot instantiate 'my_pkg\.Net': ModuleNotFoundError: No module named 'my_pkg'; check model\._target_",
        id="model-not-importable",
    ),
    pytest.param(
        lambda p: ["model=custom"], ConfigurationError,
        r"model\._target_ is missing \(\?\?\?\)(?s:.*)model\._target_=my_pkg\.Net",
        id="model-custom-without-target",
    ),
    pytest.param(
        lambda p: ["+data.dataset.colour=red"], ConfigurationError,
        r"^data\.dataset: cannot instantiate 'pipelines\.demo\.digits_dataset': TypeError: .*'colour'; check "
        r"data\.dataset\._target_ and its keyword arguments\.",
        id="dataset-with-a-wrong-kwarg",
    ),
    pytest.param(
        lambda p: ["metrics.loss._target_=torch.nn.CrossEntropyLos"], ConfigurationError,
        r"^metrics\.loss: cannot instantiate 'torch\.nn\.CrossEntropyLos': ModuleNotFoundError: No module named "
        r"'torch\.nn\.CrossEntropyLos'; check metrics\.loss\._target_",
        id="loss-misspelt",
    ),
    pytest.param(
        lambda p: ["+metrics.extra.confidence._target_=tests.integration.own_models.MeanMaxProbability",
                   "+metrics.extra.confidence.temperature=2"], ConfigurationError,
        r"^metrics\.extra\.confidence: cannot instantiate 'tests\.integration\.own_models\.MeanMaxProbability': "
        r"TypeError: .*'temperature'",
        id="metric-with-a-wrong-kwarg",
    ),
    pytest.param(
        lambda p: ["+metrics.sharpness._target_=my_pkg.sharpness"], ConfigurationError,
        r"^metrics\.sharpness: metrics has no key 'sharpness' \(its keys: .*extra\); a custom metric goes under "
        r"metrics\.extra\.<name>",
        id="custom-metric-outside-extra",
    ),
    pytest.param(
        lambda p: ["+metrics.extra.loss._target_=tests.integration.own_models.logit_norm"], ConfigurationError,
        r"metrics\.extra\.loss: 'loss' is a built-in metric's name",
        id="custom-metric-named-loss",
    ),
    pytest.param(
        lambda p: ["+metrics.extra.empty=1"], ConfigCompositionException, r"metrics\.extra\.empty=1",
        id="custom-metric-not-a-mapping",
    ),
    pytest.param(
        lambda p: ["+metrics.extra.bad._target_=tests.integration.own_models.returns_none"], MetricValueError,
        r"metrics\.extra\.bad: tests\.integration\.own_models\.returns_none\(model, batch\) returned None \(a "
        r"NoneType\) on batch 0; a metric function must return one number",
        id="metric-returns-none",
    ),
    pytest.param(
        lambda p: ["+metrics.extra.bad._target_=tests.integration.own_models.ReturnsText"], MetricValueError,
        r"metric 'bad' \(ReturnsText\) returned 'low' \(a str\) at point 0; a Metric must return one number",
        id="metric-returns-text",
    ),
    pytest.param(
        lambda p: ["adapters.forward=kwarg"], ConfigurationError,
        r"adapters\.forward: forward='kwarg' is not an option; choose one of 'auto', 'call', 'star', 'kwargs'",
        id="unknown-forward-adapter",
    ),
    pytest.param(
        lambda p: _own(p, "takes_x", "class_tokens"), AdapterError,
        r"forward='auto': the model does not take the batch as model\(\*\*batch\) with keys \['attention_mask', "
        r"'input_ids'\](?s:.*)Set the forward adapter",
        id="mapping-batch-the-model-does-not-take",
    ),
    pytest.param(
        lambda p: _own(p, "no_logits", "small_images"), AdapterError,
        r"output='auto': the model returned a dict with keys \['scores'\]; expected a tensor, a 'logits' field or a "
        r"tuple starting with a tensor(?s:.*)Set the output adapter",
        id="output-without-logits",
    ),
    pytest.param(
        lambda p: [f"checkpoint.path={_pt2_model(p)}"], CheckpointError,
        r"^checkpoint\.path='runs:/\w+/model' is an MLflow model in 'pt2' format \(MLflow 3's default(?s:.*)"
        r"set checkpoint\.trust_pickle=true",
        id="pt2-model-without-trust-pickle",
    ),
    pytest.param(
        lambda p: ["tracking.uri=sqlite:///relative.db"], ConfigurationError,
        r"tracking URI 'sqlite:///relative\.db' is a relative sqlite path(?s:.*)Use an absolute path",
        id="relative-tracking-uri",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "error", "match"), RUN_ERRORS)
def test_run_errors(overrides: Overrides, error: type[Exception], match: str, module_project: Project) -> None:
    project = module_project
    with pytest.raises(error, match=match):
        project.run("debug=default", *overrides(project))
    assert mlflow.active_run() is None
    # the failed run and its stages are closed, none left RUNNING
    assert all(r.info.status in ("FINISHED", "FAILED") for r in project.search()), [
        (r.info.run_name, r.info.status) for r in project.search()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    pytest.param(["grid.steps=0"], id="zero-steps"),
    pytest.param(["grid.range=[0,inf]"], id="infinite-range"),
    pytest.param(["data.limit=0"], id="zero-samples"),
    pytest.param(["compute.device=cuda"], id="cuda-without-gpu", marks=needs_no_cuda),
    pytest.param(["model=custom", "model._target_=my_pkg.Net"], id="model-not-importable"),
    pytest.param(["metrics.loss._target_=torch.nn.CrossEntropyLos"], id="loss-misspelt"),
    pytest.param(["adapters.output=logit"], id="unknown-output-adapter"),
    pytest.param(["+metrics.extra.m._target_=my_pkg.sharpness"], id="custom-metric-not-importable"),
    pytest.param(["+metrics.sharpness._target_=my_pkg.sharpness"], id="custom-metric-outside-extra"),
    pytest.param(["experiment=2d_three_checkpoints", "directions.towards=[outputs/demo/checkpoints/epoch_000.pt]"],
                 id="plane-with-one-towards"),
])
def test_config_errors_fail_before_any_stage_runs(overrides: list[str], project: Project) -> None:
    """A wrong option is reported before a stage computes anything or opens a run (style.md §6)."""
    with pytest.raises(ConfigurationError):
        project.run("debug=default", *overrides)
    stages = [(r.data.tags.get("landscapes.stage"), r.info.status) for r in project.search("tags.`landscapes.kind` = 'stage'")]
    assert stages == [], f"stages ran before the configuration error was raised: {stages}"
    assert not (project.root / "outputs" / "stores").exists()


@pytest.mark.slow
def test_pickled_module_loads_with_trust_pickle(project: Project) -> None:
    result = project.run("debug=default", f"checkpoint.path={_pickled_module(project)}", "checkpoint.trust_pickle=true",
                         "stop_after=checkpoint")
    run = project.client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(project.stages(run.info.run_id)) == ["checkpoint"]


@pytest.mark.slow
def test_pt2_model_loads_with_trust_pickle(project: Project) -> None:
    """An MLflow model in pt2 format, downloaded into the project's cache, read with the opt-in."""
    uri = _pt2_model(project)
    result = project.run("debug=default", f"checkpoint.path={uri}", "checkpoint.trust_pickle=true", "stop_after=checkpoint")
    assert project.client.get_run(result["run_id"]).info.status == "FINISHED"
    path = Path(result["checkpoint"])
    assert path.name == "model.pt2" and (project.root / "outputs" / "cache" / "mlflow") in path.parents
    assert project.client.get_run(result["run_id"]).data.tags["landscapes.training_run"] == uri.split("/")[1]


@pytest.mark.slow
def test_missing_checkpoint_opens_no_run(project: Project) -> None:
    """The checkpoint is looked up before any MLflow run is opened."""
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint\.path="):
        project.run("debug=default", f"checkpoint.path={project.root / 'missing.pt'}")
    assert [r.info.run_id for r in project.search()] == [project.train_run_id]


# --- a failure keeps what was computed -----------------------------------------------------


@pytest.mark.slow
def test_failing_report_keeps_the_landscape(project: Project) -> None:
    blocker = project.root / "not-a-folder"
    blocker.write_text("a file where the report wants its plots folder\n")
    with pytest.raises(NotADirectoryError):
        project.run("debug=default", f"paths.output_dir={blocker}")
    parent = project.search("tags.`landscapes.kind` = 'pipeline'")[0]
    assert parent.info.status == "FAILED"
    stages = project.stages(parent.info.run_id)
    assert {n: r.info.status for n, r in stages.items()} == {
        "checkpoint": "FINISHED", "directions": "FINISHED", "evaluate": "FINISHED", "aggregate": "FINISHED",
        "report": "FAILED",
    }
    (path,) = (project.root / "outputs" / "stores").glob("landscape-*/landscape.zarr")
    store = LandscapeStore.open(path, mode="r")
    assert store.is_complete()
    loss = store.read("loss").copy()
    assert np.isfinite(loss).all()
    assert "loss_at_theta0" in store.attrs["summary"]

    # the next run reuses the four finished stages and renders the plots from the same store
    result = project.run("debug=default")
    rerun = project.client.get_run(result["run_id"])
    assert rerun.info.status == "FINISHED"
    for name in ("checkpoint", "directions", "evaluate", "aggregate"):
        assert rerun.data.tags[f"landscapes.stage_run.{name}"] == stages[name].info.run_id, name
    assert sorted(project.stages(rerun.info.run_id)) == ["report"]
    assert Path(result["store"]) == path
    np.testing.assert_array_equal(LandscapeStore.open(path, mode="r").read("loss"), loss)
    assert result["plots"]


# --- a store made for another configuration ------------------------------------------------


@pytest.fixture(scope="module")
def made_store(hydra_configs: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 5x5 store written by the evaluate stage for fingerprint 'a'*64 (no MLflow involved)."""
    root = tmp_path_factory.mktemp("store")
    project = Project(root=root, train_run_id="")
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save(DemoMLP().state_dict(), checkpoint)
    cfg = project.resolved("debug=default")
    dirs = directions(cfg, DirectionsInputs(checkpoint, (), root / "directions"))
    inputs = EvaluateInputs(checkpoint=checkpoint, directions=dirs.path, store=root / "landscape.zarr", fingerprint="a" * 64)
    out = evaluate(cfg, inputs)
    assert out.tiles_computed >= 1
    loss = LandscapeStore.open(inputs.store, mode="r").read("loss").copy()
    return {"project": project, "inputs": inputs, "loss": loss}


STORE_ERRORS = [
    pytest.param(
        ["debug=default"], "b" * 64,
        r"landscape store .*landscape\.zarr was created for another configuration \(fingerprint 'a{64}', this run "
        r"'b{64}'\); refusing to mix results",
        id="other-fingerprint",
    ),
    pytest.param(
        ["debug=default", "grid.steps=7"], "a" * 64,
        r"has shape \(5, 5\) and metrics \['loss', 'accuracy'\], this run needs \(7, 7\)",
        id="other-shape",
    ),
    pytest.param(
        ["debug=default", "metrics.accuracy=false"], "a" * 64,
        r"this run needs \(5, 5\) and \['loss'\]",
        id="other-metrics",
    ),
]


@pytest.mark.parametrize(("overrides", "fingerprint", "match"), STORE_ERRORS)
def test_store_of_another_configuration(overrides: list[str], fingerprint: str, match: str, made_store: dict) -> None:
    project, inputs = made_store["project"], made_store["inputs"]
    cfg = project.resolved(*overrides)
    with pytest.raises(StoreError, match=match):
        evaluate(cfg, EvaluateInputs(inputs.checkpoint, inputs.directions, inputs.store, fingerprint))
    store = LandscapeStore.open(inputs.store, mode="r")  # untouched
    assert store.attrs["fingerprint"] == "a" * 64
    assert store.is_complete()
    np.testing.assert_array_equal(store.read("loss"), made_store["loss"])


def test_same_configuration_reuses_the_store(made_store: dict) -> None:
    project, inputs = made_store["project"], made_store["inputs"]
    out = evaluate(project.resolved("debug=default"), inputs)
    assert out.tiles_computed == 0 and out.tiles_reused >= 1
    np.testing.assert_array_equal(LandscapeStore.open(inputs.store, mode="r").read("loss"), made_store["loss"])
