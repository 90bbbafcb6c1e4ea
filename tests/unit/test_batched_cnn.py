"""The hand-batched plan for Sequential CNNs agrees with the per-point loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes import batched
from tests.conftest import _randomize_bn, assert_unchanged, snapshot

RTOL = 1e-5


def _wcnn() -> nn.Module:
    """W-CNN's architecture (benchmarks/workloads.py) on 1×8×8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    ).eval()


def _bn_pool_cnn() -> nn.Module:
    """BatchNorm2d (eval) first and after a convolution, max and average pooling, a strided
    convolution without bias, BatchNorm1d after the Flatten."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.BatchNorm2d(1),
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, stride=1, bias=False), nn.GELU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 1, groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10),
    )
    _randomize_bn(model)
    return model.eval()


def _shortcut_bn_cnn() -> nn.Module:
    """First convolution by linearity, then BatchNorm2d and pooling."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 10),
    )
    _randomize_bn(model)
    return model.eval()


@pytest.fixture
def digits_like() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)


def _dirs(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]


@pytest.mark.parametrize("factory", [_wcnn, _bn_pool_cnn, _shortcut_bn_cnn], ids=["wcnn", "bn-pool", "shortcut-bn"])
@pytest.mark.parametrize("batch_size", [None, 10], ids=["one-batch", "multi-batch"])
@pytest.mark.parametrize("pass_points", [6, 1], ids=["grouped", "each"])
def test_batched_cnn_equals_the_loop(factory, batch_size, pass_points, digits_like) -> None:
    x, y = digits_like
    model = factory()
    data = (x, y) if batch_size is None else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size
    )
    metrics = [L.Loss(nn.CrossEntropyLoss(), *data) if batch_size is None else L.Loss(nn.CrossEntropyLoss(), data)]
    dirs, axes = _dirs(model), [L.axis(-1, 1, 4), L.axis(-0.5, 1.5, 3)]
    before = snapshot(model)
    loop = L.evaluate(model, metrics, dirs, axes, strategy="loop")
    ev = L.Evaluator(model, metrics, dirs, strategy="batched", max_batch_points=pass_points)
    assert ev.strategy == "batched" and ev.pass_points == pass_points
    fast = L.evaluate(model, metrics, dirs, axes, strategy="batched", max_batch_points=pass_points)
    assert fast.metadata["strategy"] == "batched"
    np.testing.assert_allclose(fast["loss"], loop["loss"], rtol=RTOL)
    assert np.ptp(loop["loss"]) > 0.1  # the points differ: a plan that ignored them would fail
    assert_unchanged(model, before)


def test_the_first_convolution_is_taken_by_linearity(digits_like) -> None:
    """W-CNN's first convolution comes from the shared products, and its weights are not rebuilt per point."""
    model = _wcnn()
    ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), *digits_like), _dirs(model), strategy="batched")
    assert ev._first is not None and set(ev._first["names"]) == {"0.weight", "0.bias"}
    assert "0.weight" not in ev._plan_space.names
    # auto keeps the loop for CNNs on a CPU: it beat this plan on W-CNN on a quiet machine
    assert L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), *digits_like), _dirs(model)).strategy == "loop"


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Conv2d(1, 2, 3), nn.Linear(6, 3)],  # Linear on an image without Flatten
        [nn.Flatten(), nn.Linear(64, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 2, 1)],
        [nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(128, 3)],
        [nn.Conv1d(1, 2, 3), nn.Flatten()],
    ],
    ids=["linear-on-image", "conv-after-flatten", "reflect-padding", "conv1d"],
)
def test_uncovered_cnns_get_no_plan(layers) -> None:
    assert batched.sequential_plan(nn.Sequential(*layers)) is None


@pytest.mark.parametrize("factory", [_wcnn, _bn_pool_cnn], ids=["wcnn", "bn-pool"])
def test_one_point_passes_equal_the_grouped_pass(factory, digits_like) -> None:
    """``forward_each`` (one point after another) gives the grouped pass's outputs at points away from θ0."""
    model = factory()
    ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), *digits_like), _dirs(model), strategy="batched")
    coords = torch.tensor([[0.5, -0.25], [-1.0, 0.75], [0.0, 0.0]])
    x = digits_like[0]
    with torch.no_grad():
        grouped, each = (ev._batched_forward(x, coords, each=e) for e in (False, True))
    torch.testing.assert_close(each, grouped, rtol=1e-5, atol=1e-5)
    assert (grouped[0] - grouped[1]).abs().max() > 0.1
