"""The pipeline on models as users bring them: their class, their data, their metrics, their
config group in a folder of their own (``hydra.searchpath``), not ours.

torchvision's ResNet-18 (BatchNorm re-estimated at each point), a tiny GPT-2 (mapping batches,
next-token loss or the model's own ``.loss``), a tiny BERT classifier; and the example in
``examples/own_model``. Each checks that the store holds the values, that the loss at θ0 is the
model's own loss on the same data, and that the MLflow runs finished.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from landscapes.store import LandscapeStore
from pipelines.builders import build_dataset, build_model
from tests.ecosystem import require
from tests.integration.conftest import REPO, Project
from tests.integration.own_models import SEARCHPATH

RTOL = 1e-5
EXAMPLE = REPO / "examples" / "own_model"

# torch's note that vmap over CPU attention runs a slower, per-sample kernel
no_attention_note = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _checkpoint(project: Project, overrides: list[str], name: str, *, safetensors: bool = False) -> tuple[Any, Path]:
    """The configured model, randomly initialized (seed 0), and its state dict saved under the root."""
    cfg = project.resolved(*overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = project.root / name
    if safetensors:  # GPT-2 ties its input and output embeddings: safetensors stores one of them
        from safetensors.torch import save_model

        save_model(model, str(path))
    else:
        torch.save(model.state_dict(), path)
    return model, path


def _finished(project: Project, result: dict[str, Any], stages: tuple[str, ...] = ("checkpoint", "directions", "evaluate", "aggregate")) -> None:
    """The pipeline run and every stage it ran or reused are FINISHED."""
    run = project.client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in project.stages(run.info.run_id).values())
    for name in stages:
        stage_run = project.client.get_run(run.data.tags[f"landscapes.stage_run.{name}"])
        assert stage_run.info.status == "FINISHED", name


def _store(result: dict[str, Any]) -> LandscapeStore:
    store = LandscapeStore.open(Path(result["store"]), mode="r")
    assert store.is_complete()
    return store


def _all(cfg) -> Any:
    """The configured data as one batch (every sample)."""
    dataset = build_dataset(cfg.data)
    return next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))


@pytest.mark.slow
@pytest.mark.requires_models
@no_attention_note
def test_torchvision_resnet18_with_batchnorm_recomputed(module_project: Project) -> None:
    require("torchvision")
    project = module_project
    overrides = [SEARCHPATH, "experiment=resnet18"]
    model, path = _checkpoint(project, overrides, "resnet18.pt")
    result = project.run(*overrides, f"checkpoint.path={path}")
    _finished(project, result)
    store = _store(result)
    assert store.attrs["evaluation"]["model_mode"] == "recompute_bn" and store.attrs["evaluation"]["bn_batches"] == 2
    loss = store.read("loss")
    assert loss.shape == (3,) and np.isfinite(loss).all()

    cfg = project.resolved(*overrides)
    loader = DataLoader(build_dataset(cfg.data), batch_size=cfg.data.batch_size)
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, ref)  # reset, momentum=None, the same two batches
    x, y = _all(cfg)
    with torch.no_grad():
        want = F.cross_entropy(ref.eval()(x), y).item()
    assert result["summary"]["loss_at_theta0"] == pytest.approx(want, rel=RTOL)
    assert loss[1] == pytest.approx(want, rel=RTOL)


@pytest.mark.slow
@pytest.mark.requires_models
@no_attention_note
def test_transformers_tiny_gpt2_next_token_loss_and_its_own_loss(module_project: Project) -> None:
    require("transformers")
    project = module_project
    overrides = [SEARCHPATH, "experiment=tiny_gpt2"]
    model, path = _checkpoint(project, overrides, "tiny_gpt2.safetensors", safetensors=True)
    batch = _all(project.resolved(*overrides))
    with torch.no_grad():
        own = model(**batch)
    counted = batch["labels"][:, 1:] != -100
    accuracy = ((own.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & counted).sum() / counted.sum()

    shifted = project.run(*overrides, f"checkpoint.path={path}")  # Loss(CrossEntropyLoss, shift=True)
    _finished(project, shifted)
    summary = shifted["summary"]
    assert summary["loss_at_theta0"] == pytest.approx(own.loss.item(), rel=RTOL)
    assert summary["perplexity_at_theta0"] == pytest.approx(np.exp(own.loss.item()), rel=RTOL)
    assert summary["accuracy_at_theta0"] == pytest.approx(accuracy.item(), rel=RTOL)
    assert list(_store(shifted).metrics) == ["loss", "accuracy", "perplexity"]

    own_loss = project.run(*overrides, f"checkpoint.path={path}", "metrics.model_loss=true")  # output.loss
    _finished(project, own_loss)
    assert own_loss["store"] != shifted["store"]
    assert own_loss["summary"]["loss_at_theta0"] == pytest.approx(own.loss.item(), rel=RTOL)
    np.testing.assert_allclose(_store(own_loss).read("loss"), _store(shifted).read("loss"), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.requires_models
@no_attention_note
def test_transformers_tiny_bert_sequence_classification(module_project: Project) -> None:
    require("transformers")
    project = module_project
    overrides = [SEARCHPATH, "experiment=tiny_bert"]
    model, path = _checkpoint(project, overrides, "tiny_bert.pt")
    batch = _all(project.resolved(*overrides))
    with torch.no_grad():
        own = model(**batch)
    result = project.run(*overrides, f"checkpoint.path={path}")
    _finished(project, result)
    assert result["summary"]["loss_at_theta0"] == pytest.approx(own.loss.item(), rel=RTOL)
    want = (own.logits.argmax(-1) == batch["labels"]).double().mean().item()
    assert result["summary"]["accuracy_at_theta0"] == pytest.approx(want, rel=RTOL)
    assert np.isfinite(_store(result).read("loss")).all()


@pytest.mark.slow
def test_the_example_package_with_its_own_config_group(module_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/own_model as its README runs it: the user's package on the path, its config
    group through hydra.searchpath, a custom metric stored and plotted like the built-in ones."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from my_models.train import train

    project = module_project
    path = train(project.root / "my_net.pt", epochs=2)
    result = project.run(f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]", "experiment=my_landscape",
                         f"checkpoint.path={path}", "grid.steps=5", "plot.html=false")
    _finished(project, result, ("checkpoint", "directions", "evaluate", "aggregate", "report"))
    store = _store(result)
    assert list(store.metrics) == ["loss", "accuracy", "margin"]
    assert np.isfinite(store.read("margin")).all()
    assert any(Path(p).name.startswith("margin_") for p in result["plots"])
    assert "margin_at_theta0" in result["summary"]
    for name in [m for m in sys.modules if m == "my_models" or m.startswith("my_models.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.slow
def test_custom_metrics_and_model_custom(module_project: Project) -> None:
    """model=custom starts from no keyword arguments; a function f(model, batch), a Metric
    subclass and a DatasetMetric subclass, several at once, each stored under its name."""
    project = module_project
    overrides = [
        "model=custom", "model._target_=pipelines.demo.DemoMLP", "+model.hidden=[16]", "grid=line", "grid.steps=3",
        "data.limit=64", "plot.enabled=false", "compute.progress=false",
        "+metrics.extra.norm._target_=tests.integration.own_models.logit_norm", "+metrics.extra.norm.scale=2.0",
        "+metrics.extra.confidence._target_=tests.integration.own_models.MeanMaxProbability",
    ]
    model, path = _checkpoint(project, overrides, "mlp16.pt")
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [16, 10]
    result = project.run(*overrides, f"checkpoint.path={path}")
    _finished(project, result)
    store = _store(result)
    assert list(store.metrics) == ["loss", "accuracy", "norm", "confidence"]
    x, y = _all(project.resolved(*overrides))
    with torch.no_grad():
        logits = model(x)
    assert store.read("norm")[1] == pytest.approx(2.0 * logits.norm(dim=-1).mean().item(), rel=RTOL)
    assert store.read("confidence")[1] == pytest.approx(logits.softmax(-1).amax(-1).mean().item(), rel=RTOL)
    assert result["summary"]["loss_at_theta0"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=RTOL)


@pytest.mark.slow
def test_mlflow_checkpoint_is_downloaded_once_into_the_cache_and_reused(project: Project) -> None:
    """A runs:/ checkpoint lands in <root>/outputs/cache/mlflow at a path named by its content:
    re-running the same command reuses the checkpoint stage (its key is that path)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(project.uri)
    try:
        with mlflow.start_run(experiment_id=project.experiment_id) as logged:
            mlflow.log_artifact(str(project.checkpoint(4)), artifact_path="weights")
    finally:
        mlflow.set_tracking_uri(previous)
    uri = f"runs:/{logged.info.run_id}/weights/epoch_004.pt"
    args = ("debug=default", f"checkpoint.path={uri}", "plot.enabled=false")
    first = project.run(*args)
    second = project.run(*args)
    cache = project.root / "outputs" / "cache" / "mlflow"
    assert first["checkpoint"] == second["checkpoint"]
    assert cache in Path(first["checkpoint"]).parents and Path(first["checkpoint"]).name == "epoch_004.pt"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".download-")] == []  # no leftovers
    runs = [project.client.get_run(r["run_id"]) for r in (first, second)]
    assert runs[1].data.tags["landscapes.stage_run.checkpoint"] == runs[0].data.tags["landscapes.stage_run.checkpoint"]
    assert runs[1].data.tags["landscapes.training_run"] == logged.info.run_id
    assert first["store"] == second["store"]
