"""The demo training run: checkpoints that load, metrics in MLflow, a model that learned."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from landscapes.checkpoints import load_into, load_state_dict
from landscapes.errors import ConfigurationError
from pipelines.demo import DemoCNN, DemoMLP, digits_dataset, load_digits_tensors
from pipelines.training import TrainResult, train, train_demo


@pytest.fixture
def uri(tmp_path: Path):
    previous = mlflow.get_tracking_uri()
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(previous)


def test_digits_tensors() -> None:
    x, y = load_digits_tensors()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    std = x.std(dim=0, unbiased=False)
    constant = std < 1e-6
    assert constant.any()  # border pixels are always 0 in digits
    assert torch.all(x[:, constant] == 0)
    torch.testing.assert_close(x.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        std[~constant], torch.ones(int((~constant).sum())), atol=1e-4, rtol=0
    )
    raw, _ = load_digits_tensors(standardize=False)
    assert raw.max() == 16
    assert len(digits_dataset()) == 1797


def test_demo_models() -> None:
    x, _ = load_digits_tensors()
    mlp = DemoMLP()
    assert isinstance(mlp.net, torch.nn.Sequential)
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert mlp(x[:5]).shape == (5, 10)
    assert DemoMLP(hidden=(32,))(x[:2]).shape == (2, 10)
    cnn = DemoCNN()
    assert cnn(x[:5]).shape == (5, 10)
    assert cnn(x[:5].reshape(5, 1, 8, 8)).shape == (5, 10)
    assert cnn.net[-1].in_features == 2048


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"train.epochs=0: expected a positive integer"):
        train_demo(tmp_path, epochs=0)


@pytest.mark.slow
def test_train_demo(tmp_path: Path, uri: str) -> None:
    result = train_demo(tmp_path / "out", epochs=4, checkpoint_every=2, tracking_uri=uri)
    assert isinstance(result, TrainResult)
    assert [p.name for p in result.checkpoints] == ["epoch_000.pt", "epoch_002.pt", "epoch_004.pt"]
    assert result.final_accuracy > 0.9

    x, y = load_digits_tensors()
    final = load_into(DemoMLP(), load_state_dict(result.checkpoints[-1]))
    with torch.no_grad():
        accuracy = float((final(x).argmax(dim=1) == y).float().mean())
        loss = float(torch.nn.functional.cross_entropy(final(x), y))
    assert accuracy == pytest.approx(result.final_accuracy)
    assert loss == pytest.approx(result.final_loss, rel=1e-5)
    init = load_into(DemoMLP(), load_state_dict(result.checkpoints[0]))
    assert not torch.equal(init.net[0].weight, final.net[0].weight)

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["landscapes.kind"] == "train"
    assert run.data.params["epochs"] == "4" and run.data.params["hidden"] == "[128,128]"
    history = client.get_metric_history(result.run_id, "train_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert history[-1].value == pytest.approx(result.final_accuracy)
    losses = [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
    assert losses[-1] < losses[0]
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "checkpoints")]
    assert artifacts == [f"checkpoints/{p.name}" for p in result.checkpoints]

    # Same seed, same weights.
    again = train(
        {"out_dir": tmp_path / "again", "epochs": 4, "checkpoint_every": 2, "tracking_uri": uri}
    )
    torch.testing.assert_close(
        load_state_dict(again.checkpoints[-1]),
        load_state_dict(result.checkpoints[-1]),
        rtol=0,
        atol=0,
    )
