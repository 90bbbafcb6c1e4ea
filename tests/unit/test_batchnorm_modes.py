"""BatchNorm's three honest modes: running statistics (eval), batch statistics with dropout off
(train), and statistics re-estimated at each point from fixed batches (recompute_bn)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscapes as L
from landscapes.errors import FallbackWarning, LandscapesWarning
from tests.conftest import assert_unchanged, make_cnn, snapshot

RTOL = 1e-5


def _bn_dropout_mlp() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    from tests.conftest import _randomize_bn

    _randomize_bn(model)
    return model.eval()


def _moved(model: nn.Module, dirs, coords) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(sum(float(c) * d[name] for c, d in zip(coords, dirs, strict=True)))
    return ref


def _update_bn_reference(model, dirs, coords, bn_batches, x, y) -> float:
    """Deep copy at the point; reset statistics; the same batches in train mode with
    momentum=None and no gradients; then the eval-mode loss on all the data."""
    ref = _moved(model, dirs, coords)
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for xb in bn_batches:
            ref(xb)
        ref.eval()
        return F.cross_entropy(ref(x), y).item()


@pytest.mark.parametrize("factory,data_name", [
    pytest.param(lambda: make_cnn(batchnorm=True), "image_data", id="cnn-bn2d"),
    pytest.param(_bn_dropout_mlp, "data", id="mlp-bn1d-dropout"),
])
def test_recompute_bn_equals_an_independent_reference(factory, data_name, request) -> None:
    x, y = request.getfixturevalue(data_name)
    model = factory()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    axes = [L.axis(-1, 1, 3), np.array([0.0, 0.7])]
    before = snapshot(model)
    land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), loader), dirs, axes, model_mode="recompute_bn", bn_batches=3)
    assert_unchanged(model, before)  # the model's own statistics, bit for bit
    assert land.metadata["model_mode"] == "recompute_bn" and land.metadata["bn_batches"] == 3
    assert land.metadata["strategy"] == "loop"
    first = [x[i : i + 8] for i in range(0, 24, 8)]
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            want = _update_bn_reference(model, dirs, (a, b), first, x, y)
            assert land["loss"][i, j] == pytest.approx(want, rel=RTOL)
    # and it is not eval mode: θ0's statistics give other values away from θ0
    stale = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), loader), dirs, axes)
    assert not np.allclose(stale["loss"], land["loss"], rtol=1e-3)


def test_recompute_bn_reads_the_same_batches_at_every_point(data) -> None:
    """A shuffling DataLoader gives other batches on each pass; the statistics come from the
    batches read once, so equal points get equal values."""
    x, y = data
    model = _bn_dropout_mlp()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    d = L.random_direction(model, seed=0)
    land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), loader), [d], [np.array([0.5, 0.5, 0.5])], model_mode="recompute_bn", bn_batches=2)
    # the loss's own batches differ on each pass: equal up to the order of the sum
    np.testing.assert_allclose(land["loss"], land["loss"][0], rtol=1e-6)


def test_recompute_bn_batched_uses_vmap_with_a_warning(data) -> None:
    x, y = data
    model = _bn_dropout_mlp()
    with pytest.warns(FallbackWarning, match="strategy='batched' keeps θ0's BatchNorm statistics.*using 'vmap'"):
        ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), x, y), [L.random_direction(model, seed=0)], strategy="batched", model_mode="recompute_bn")
    assert ev.strategy == "vmap"


def test_recompute_bn_without_batchnorm_is_eval_mode(mlp, data) -> None:
    x, y = data
    dirs = [L.random_direction(mlp, seed=0)]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    a = L.evaluate(mlp, metric, dirs, [L.axis(-1, 1, 3)], model_mode="recompute_bn")
    b = L.evaluate(mlp, metric, dirs, [L.axis(-1, 1, 3)], strategy="loop")
    np.testing.assert_array_equal(a["loss"], b["loss"])


def test_train_mode_uses_batch_statistics_with_dropout_off(data) -> None:
    x, y = data
    model = _bn_dropout_mlp()
    dirs = [L.random_direction(model, seed=0)]
    axes = [L.axis(-1, 1, 3)]
    with pytest.warns(FallbackWarning, match="in train mode cannot be batched"):
        land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, axes, model_mode="train")
    for i, c in enumerate(axes[0]):
        ref = _moved(model, dirs, (c,)).eval()
        ref[1].train()  # BatchNorm only: dropout stays off, so the value is deterministic
        with torch.no_grad():
            assert land["loss"][i] == pytest.approx(F.cross_entropy(ref(x), y).item(), rel=RTOL)


def test_active_dropout_as_is_warns_that_values_are_random(data) -> None:
    x, y = data
    model = _bn_dropout_mlp().train()
    with pytest.warns(LandscapesWarning, match="dropout is active, so every value is random"):
        with pytest.warns(FallbackWarning):
            L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), x, y), [L.random_direction(model, seed=0)], model_mode="as_is")


def test_recalibrate_bn_leaves_modes_and_momentum() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, momentum=0.3), nn.Dropout(0.2)).eval()
    xs = [torch.randn(5, 2), torch.randn(7, 2)]
    assert L.recalibrate_bn(net, xs) == 2
    assert not any(m.training for m in net.modules()) and net[1].momentum == 0.3
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in xs])
        means = torch.stack([net[0](x).mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means)
    assert h.shape == (12, 3)


# -- recompute_bn batched over the tile (strategy="vmap") -------------------------------------
def _loader(x, y, batch_size: int = 8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _recompute_equals_loop_and_reference(model, x, y, axes, bn_batches, batch_size=8, reference_at=None) -> None:
    """vmap recompute_bn equals the per-point loop at every point, and a deep copy re-estimated
    by hand at the grid indices ``reference_at`` (default every point); the model's own
    statistics come back bit for bit."""
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    before = snapshot(model)
    runs = {s: L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), _loader(x, y, batch_size)), dirs, axes, strategy=s,
                          model_mode="recompute_bn", bn_batches=bn_batches) for s in ("loop", "vmap")}
    assert_unchanged(model, before)
    assert {s: land.metadata["strategy"] for s, land in runs.items()} == {"loop": "loop", "vmap": "vmap"}
    np.testing.assert_allclose(runs["vmap"]["loss"], runs["loop"]["loss"], rtol=RTOL)
    first = [x[i : i + batch_size] for i in range(0, bn_batches * batch_size, batch_size)]
    for i, j in reference_at or np.ndindex(runs["vmap"]["loss"].shape):
        want = _update_bn_reference(model, dirs, (axes[0][i], axes[1][j]), first, x, y)
        assert runs["vmap"]["loss"][i, j] == pytest.approx(want, rel=RTOL)


@pytest.mark.parametrize("bn_batches", [1, 3])
def test_recompute_bn_under_vmap_equals_the_loop_cnn(bn_batches, image_data) -> None:
    x, y = image_data  # 40 samples: 5 batches of 8
    _recompute_equals_loop_and_reference(make_cnn(batchnorm=True), x, y, [L.axis(-1, 1, 3), np.array([0.0, 0.7])], bn_batches)


@pytest.mark.requires_models
@pytest.mark.parametrize("bn_batches", [1, 3])
def test_recompute_bn_under_vmap_equals_the_loop_resnet18(bn_batches) -> None:
    from tests.ecosystem import require

    tv = require("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(5)
    # 3 batches of 6: with 4 images, layer4's 1×1 maps give statistics of 4 numbers, and the
    # values at the point then hang on rounding (5e-5 apart between any two exact methods)
    x, y = torch.randn(18, 3, 32, 32, generator=g), torch.randint(0, 10, (18,), generator=g)
    axes = [np.array([-0.5, 0.5]), np.array([0.0, 0.5])]
    _recompute_equals_loop_and_reference(model, x, y, axes, bn_batches, batch_size=6, reference_at=[(0, 1), (1, 0)])


def test_recompute_bn_under_vmap_in_chunks_and_its_memory(image_data) -> None:
    """Several chunks in one call give the same values; a point's bytes count its own
    statistics and one more copy of its activations."""
    x, y = image_data
    model = make_cnn(batchnorm=True)
    metric = L.Loss(nn.CrossEntropyLoss(), _loader(x, y))
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    coords = np.array([[-1.0, 0.0], [-0.5, 0.3], [0.0, 0.0], [0.4, -0.2], [1.0, 0.7]])
    small = L.Evaluator(model, metric, dirs, strategy="vmap", model_mode="recompute_bn", bn_batches=2, max_batch_points=2)
    whole = L.Evaluator(model, metric, dirs, strategy="vmap", model_mode="recompute_bn", bn_batches=2)
    loop = L.Evaluator(model, metric, dirs, strategy="loop", model_mode="recompute_bn", bn_batches=2)
    assert small.pass_points == 2 and whole.pass_points == whole.tile_points > 2
    want = loop.evaluate_points(coords)["loss"]
    for ev in (small, whole):
        np.testing.assert_allclose(ev.evaluate_points(coords)["loss"], want, rtol=RTOL)
    stale = L.Evaluator(model, metric, dirs, strategy="vmap")
    stats = 2 * 4 * 4  # BatchNorm2d(4): running_mean and running_var in float32
    assert whole.bytes_per_point - stale.bytes_per_point == stats + whole._activation_bytes() > stats


class _CheckedCNN(nn.Module):
    """A CNN whose forward asks a tensor for a Python number: vmap rejects it."""

    def __init__(self):
        super().__init__()
        self.net = make_cnn(batchnorm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("non-finite output")
        return out


def test_recompute_bn_falls_back_to_the_loop_when_vmap_rejects_the_model(image_data) -> None:
    x, y = image_data
    model = _CheckedCNN().eval()
    dirs = [L.random_direction(model, seed=0)]
    axes = [L.axis(-1, 1, 3)]
    before = snapshot(model)
    with pytest.warns(FallbackWarning, match=r"vmap failed \(RuntimeError: .*data-dependent control flow.*using the per-point loop"):
        land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), _loader(x, y)), dirs, axes, strategy="vmap",
                          model_mode="recompute_bn", bn_batches=2)
    assert_unchanged(model, before)
    assert land.metadata["strategy"] == "loop" and land.metadata["strategy_reason"] == "vmap failed: RuntimeError"
    loop = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), _loader(x, y)), dirs, axes, strategy="loop",
                      model_mode="recompute_bn", bn_batches=2)
    np.testing.assert_array_equal(land["loss"], loop["loss"])


class _Norm(L.Metric):
    def __call__(self, model_wrapper) -> float:
        return float(sum(p.detach().norm() ** 2 for p in model_wrapper.modules[0].parameters()))


def test_recompute_bn_with_a_custom_metric_falls_back_to_the_loop(image_data) -> None:
    x, y = image_data
    model = make_cnn(batchnorm=True)
    dirs, axes = [L.random_direction(model, seed=0)], [L.axis(-1, 1, 3)]
    with pytest.warns(FallbackWarning, match=r"per-point loop because custom metrics \['_Norm'\] follow the model-wrapper protocol"):
        land = L.evaluate(model, [L.Loss(nn.CrossEntropyLoss(), _loader(x, y)), _Norm()], dirs, axes, strategy="vmap",
                          model_mode="recompute_bn", bn_batches=2)
    assert land.metadata["strategy"] == "loop"
    loop = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), _loader(x, y)), dirs, axes, strategy="loop", model_mode="recompute_bn", bn_batches=2)
    np.testing.assert_array_equal(land["loss"], loop["loss"])
    assert land["_norm"][1] == pytest.approx(_Norm()(L.wrap_model(model)), rel=RTOL)  # θ0


def test_recompute_bn_auto_on_a_cpu_is_the_loop(image_data) -> None:
    x, y = image_data
    model = make_cnn(batchnorm=True)
    ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), x, y), [L.random_direction(model, seed=0)], model_mode="recompute_bn")
    assert (ev.strategy, ev.describe()["strategy"]) == ("loop", "loop")


def test_recompute_bn_under_vmap_with_mapping_batches(image_data) -> None:
    """A batch that reaches the model through an adapter (``model(**batch)``) carries the
    per-point statistics through it too."""
    x, y = image_data
    model = make_cnn(batchnorm=True)
    metric = L.Loss(nn.CrossEntropyLoss(), {"x": x}, y)
    dirs, axes = [L.random_direction(model, seed=0)], [L.axis(-1, 1, 3)]
    runs = [L.evaluate(model, metric, dirs, axes, strategy=s, model_mode="recompute_bn", forward="kwargs") for s in ("loop", "vmap")]
    assert runs[1].metadata["strategy"] == "vmap"
    np.testing.assert_allclose(runs[1]["loss"], runs[0]["loss"], rtol=RTOL)
    assert not np.allclose(runs[1]["loss"], L.evaluate(model, metric, dirs, axes, forward="kwargs")["loss"], rtol=1e-3)
