"""The engine: strategies agree with each other and with a float64 reference; θ0 where it belongs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes.errors import FallbackWarning
from tests.conftest import assert_unchanged, make_cnn, make_mlp, snapshot
from tests.reference.landscape_reference import landscape_reference

RTOL = 1e-5

MODELS = [
    pytest.param(make_mlp, "data", id="mlp"),
    pytest.param(lambda: make_mlp(batchnorm=True), "data", id="mlp-bn"),
    pytest.param(make_cnn, "image_data", id="cnn"),
    pytest.param(lambda: make_cnn(batchnorm=True), "image_data", id="cnn-bn"),
]


def _dirs(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]


@pytest.mark.parametrize("factory,data_name", MODELS)
@pytest.mark.parametrize("strategy", ["vmap", "batched", "auto"])
def test_batched_tiles_equal_the_loop(factory, data_name, strategy, request) -> None:
    x, y = request.getfixturevalue(data_name)
    model = factory()
    dirs, axes = _dirs(model), [L.axis(-1, 1, 7), L.axis(-0.5, 1.5, 5)]
    metric = [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]
    loop = L.evaluate(model, metric, dirs, axes, strategy="loop")
    with pytest.warns(FallbackWarning) if strategy == "batched" and "cnn" in request.node.callspec.id else _nothing():
        fast = L.evaluate(model, metric, dirs, axes, strategy=strategy, max_batch_points=6)
    np.testing.assert_allclose(fast["loss"], loop["loss"], rtol=RTOL)
    np.testing.assert_allclose(fast["accuracy"], loop["accuracy"], atol=1e-12)
    if strategy == "batched" and "mlp" in request.node.callspec.id:
        assert fast.metadata["strategy"] == "batched"


def _wide_mlp(kind: str) -> nn.Module:
    torch.manual_seed(4)
    if kind == "no-first-bias":
        layers = [nn.Linear(6, 32, bias=False), nn.ReLU(), nn.Linear(32, 3)]
    elif kind == "bn-input":
        layers = [nn.BatchNorm1d(6), nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 3)]
    elif kind == "inplace-first":
        layers = [nn.ReLU(inplace=True), nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 3)]
    else:
        layers = [nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3)]
    model = nn.Sequential(*layers)
    from tests.conftest import _randomize_bn

    _randomize_bn(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["bn-hidden", "no-first-bias", "bn-input", "inplace-first"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_point_passes_equal_the_loop_and_the_reference(kind, k) -> None:
    """On a CPU, MLPs with over 1 MiB of activations per point run batched tiles one point
    per pass (reused buffers, shared first-layer products): same values as every other path."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5000, 6, generator=g), torch.randint(0, 3, (5000,), generator=g)
    x_before = x.clone()
    model = _wide_mlp(kind)
    dirs = [L.random_direction(model, seed=s) for s in range(k)]
    axes = [L.axis(-1, 1, 5), L.axis(-0.5, 1.5, 4), L.axis(0.0, 1.0, 3)][:k]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    ev = L.Evaluator(model, metric, dirs)
    assert (ev.strategy, ev.pass_points) == ("batched", 1) and ev.tile_points > 1
    before = snapshot(model)
    fast = L.evaluate(model, metric, dirs, axes)
    assert fast.metadata["pass_points"] == 1
    assert_unchanged(model, before)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # nothing ran in place on the data
    loop = L.evaluate(model, metric, dirs, axes, strategy="loop")
    np.testing.assert_allclose(fast["loss"], loop["loss"], rtol=RTOL)
    want = landscape_reference(model, nn.CrossEntropyLoss(), x, y, dirs, axes)
    np.testing.assert_allclose(fast["loss"], want, rtol=RTOL)


def test_single_linear_sequential_is_batched_through_the_shortcut_alone(data) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 3))  # every parameter is in the first layer
    x, y = data
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    dirs, axes = _dirs(model), [L.axis(-1, 1, 5), L.axis(-1, 1, 4)]
    land = L.evaluate(model, metric, dirs, axes)
    assert land.metadata["strategy"] == "batched"
    np.testing.assert_allclose(land["loss"], landscape_reference(model, nn.CrossEntropyLoss(), x, y, dirs, axes), rtol=RTOL)


def test_one_point_passes_over_a_dataloader_give_the_dataset_mean() -> None:
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(8000, 6, generator=g), torch.randint(0, 3, (8000,), generator=g)
    model = _wide_mlp("bn-hidden")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3000)
    dirs, axes = _dirs(model), [L.axis(-1, 1, 4), L.axis(-1, 1, 3)]
    land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), loader), dirs, axes)
    assert (land.metadata["strategy"], land.metadata["pass_points"]) == ("batched", 1)
    want = landscape_reference(model, nn.CrossEntropyLoss(), x, y, dirs, axes)
    np.testing.assert_allclose(land["loss"], want, rtol=RTOL)


@pytest.mark.parametrize("factory,data_name", MODELS)
def test_engine_matches_float64_reference(factory, data_name, request) -> None:
    x, y = request.getfixturevalue(data_name)
    model = factory()
    dirs, axes = _dirs(model), [L.axis(-1, 1, 5), L.axis(0.25, 2.0, 4)]
    got = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, axes)
    want = landscape_reference(model, nn.CrossEntropyLoss(), x, y, dirs, axes)
    np.testing.assert_allclose(got["loss"], want, rtol=RTOL)


def test_non_square_grid_and_range_without_zero_land_in_place(mlp, data) -> None:
    x, y = data
    dirs = _dirs(mlp)
    ax = [np.array([0.3, 0.9, 1.7]), np.array([-2.0, -1.5, -1.25, -0.5, -0.1, -0.05, -0.01])]
    land = L.evaluate(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, ax, max_batch_points=4)
    assert land["loss"].shape == (3, 7)
    ref = landscape_reference(mlp, nn.CrossEntropyLoss(), x, y, dirs, ax)
    np.testing.assert_allclose(land["loss"], ref, rtol=RTOL)
    ds = land.to_xarray()
    assert ds["loss"].dims == ("x", "y")
    assert float(ds["loss"].sel(x=0.9, y=-1.25)) == pytest.approx(ref[1, 2], rel=RTOL)


def test_theta0_at_centre(mlp, data) -> None:
    x, y = data
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    land = L.evaluate(mlp, metric, _dirs(mlp), [L.axis(-1, 1, 9), L.axis(-1, 1, 9)])
    assert land["loss"][4, 4] == pytest.approx(L.point(mlp, metric), rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_loop_writes_each_point_in_place_as_origin_plus_c_basis(image_data, k) -> None:
    """The loop's per-point θ (written into the parameters, no (m, n) matrix) equals
    ``origin + c·basis`` in float64 to 1e-6, and θ0 exactly at c = 0."""
    x, y = image_data
    model = make_cnn(batchnorm=True)
    dirs = [L.random_direction(model, seed=s) for s in range(k)]
    ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, strategy="loop")
    c = torch.tensor([[0.0] * k, [0.5, -1.5, 2.0][:k], [0.0, 2.0, 0.0][:k], [-3.0, 0.0, 1.0][:k]])
    want = ev.origin.double() + c.double() @ ev.basis.double()
    before = snapshot(model)
    set_point = ev._setter(c)
    with ev._model_state(), torch.no_grad():
        for p in range(len(c)):
            set_point(p)
            got = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).double()
            torch.testing.assert_close(got, want[p], rtol=1e-6, atol=1e-6)
            if p == 0:
                assert torch.equal(got, ev.origin.double())
    assert_unchanged(model, before)


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀHθ − bᵀθ, the 'model' returns it; the loss is the output itself."""

    def __init__(self, h: torch.Tensor, b: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("b", b)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 0.5 * self.theta @ self.h @ self.theta - self.b @ self.theta
        return f.expand(x.shape[0])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_quadratic_with_known_hessian_gives_the_analytic_landscape(strategy) -> None:
    g = torch.Generator().manual_seed(0)
    n = 6
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    theta0 = torch.randn(n, generator=g, dtype=torch.float64)
    model = Quadratic(h, b, theta0).double()
    d1 = torch.randn(n, generator=g, dtype=torch.float64)
    d2 = torch.randn(n, generator=g, dtype=torch.float64)
    x, target = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    metric = L.Loss(lambda out, _t: out.mean(), x, target)
    ax = [L.axis(-2, 1, 7), L.axis(-1, 3, 6)]
    land = L.evaluate(model, metric, [{"theta": d1}, {"theta": d2}], ax, strategy=strategy)
    f0 = 0.5 * theta0 @ h @ theta0 - b @ theta0
    grad = h @ theta0 - b
    aa, bb = np.meshgrid(ax[0], ax[1], indexing="ij")
    analytic = (
        float(f0) + aa * float(grad @ d1) + bb * float(grad @ d2)
        + 0.5 * (aa**2 * float(d1 @ h @ d1) + 2 * aa * bb * float(d1 @ h @ d2) + bb**2 * float(d2 @ h @ d2))
    )
    np.testing.assert_allclose(land["loss"], analytic, rtol=1e-10)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_model_is_restored_after_success(strategy, bn, data) -> None:
    x, y = data
    model = make_mlp(batchnorm=bn).train()
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(model), [L.axis(-1, 1, 3)] * 2, strategy=strategy)
    assert_unchanged(model, before)


def test_model_is_restored_after_failure(mlp, data) -> None:
    x, y = data
    calls = []

    def exploding(out, target):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, target)

    before = snapshot(mlp)
    with pytest.raises(L.EvaluationError, match="tile .* failed: RuntimeError: boom"):
        L.evaluate(mlp, L.Loss(exploding, x, y), _dirs(mlp), [L.axis(-1, 1, 3)] * 2, strategy="loop")
    assert_unchanged(mlp, before)


def test_dataloader_gives_the_exact_dataset_mean(mlp, data) -> None:
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # last batch 2
    dirs, ax = _dirs(mlp), [L.axis(-1, 1, 3)] * 2
    for strategy in ("loop", "batched"):
        full = L.evaluate(mlp, [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)], dirs, ax, strategy=strategy)
        batched = L.evaluate(mlp, [L.Loss(nn.CrossEntropyLoss(), loader), L.Accuracy(loader)], dirs, ax, strategy=strategy)
        np.testing.assert_allclose(batched["loss"], full["loss"], rtol=1e-6)
        np.testing.assert_allclose(batched["accuracy"], full["accuracy"], atol=1e-12)


def test_custom_metric_protocol_goes_through_the_loop(mlp, data) -> None:
    x, y = data

    class WeightNorm(L.Metric):
        name = "wnorm"

        def __call__(self, model_wrapper):
            return float(sum(p.double().pow(2).sum() for p in model_wrapper.parameters()) ** 0.5)

    dirs = _dirs(mlp)
    land = L.evaluate(mlp, [WeightNorm(), L.Loss(nn.CrossEntropyLoss(), x, y)], dirs[:1], [L.axis(0, 1, 3)])
    assert land.metadata["strategy"] == "loop"
    theta0 = torch.cat([p.detach().reshape(-1) for p in mlp.parameters()]).double()
    dflat = torch.cat([dirs[0][n].reshape(-1) for n, _ in mlp.named_parameters()]).double()
    want = [float((theta0 + c * dflat).norm()) for c in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(land["wnorm"], want, rtol=1e-6)


def test_train_mode_batchnorm_falls_back_with_a_warning(data) -> None:
    x, y = data
    model = make_mlp(batchnorm=True)
    with pytest.warns(FallbackWarning, match="train mode cannot be batched"):
        land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(model)[:1], [L.axis(-1, 1, 3)], model_mode="train")
    assert land.metadata["strategy"] == "loop"


def test_data_dependent_control_flow_falls_back_from_vmap(data) -> None:
    x, y = data

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, inp):
            out = self.fc(inp)
            if out.sum() > 0:  # data-dependent: vmap cannot trace it
                return out
            return -out

    torch.manual_seed(0)
    model = Branchy().eval()
    dirs = [L.random_direction(model, seed=0)]
    loop = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, [L.axis(-1, 1, 5)], strategy="loop")
    with pytest.warns(FallbackWarning, match="vmap failed"):
        fast = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, [L.axis(-1, 1, 5)], strategy="vmap")
    np.testing.assert_allclose(fast["loss"], loop["loss"], rtol=RTOL)


def test_tile_function_is_self_contained(mlp, data) -> None:
    import pickle

    x, y = data
    ax = [L.axis(-1, 1, 6), L.axis(-1, 1, 4)]
    dirs = _dirs(mlp)
    full = L.evaluate(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), dirs, ax)
    ev = L.Evaluator(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), dirs)
    clone = pickle.loads(pickle.dumps(ev))  # as a worker would receive it
    block = L.evaluate_tile(clone, ax, (slice(2, 5), slice(1, 4)))
    np.testing.assert_allclose(block["loss"], full["loss"][2:5, 1:4], rtol=RTOL)


def test_memory_budget_sets_the_tile_size(mlp, data) -> None:
    x, y = data
    small = L.Evaluator(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(mlp), strategy="batched", memory_budget=200_000)
    large = L.Evaluator(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(mlp), strategy="batched", memory_budget=50_000_000)
    assert 1 <= small.tile_points < large.tile_points


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(ignore_index=1)],
    ids=["plain", "label-smoothing", "ignore-index"],
)
def test_batched_cross_entropy_paths_equal_the_loss_function(mlp, data, loss_fn) -> None:
    """Each shortcut of Loss for many points at once equals ``loss_fn`` called point by point."""
    x, y = data
    dirs, axes = _dirs(mlp), [L.axis(-1, 1, 4), L.axis(-1, 1, 3)]
    fast = L.evaluate(mlp, L.Loss(loss_fn, x, y), dirs, axes, strategy="batched")
    want = landscape_reference(mlp, loss_fn, x, y, dirs, axes)
    np.testing.assert_allclose(fast["loss"], want, rtol=RTOL)


def test_loop_goes_point_by_point_over_blocks_of_batches(monkeypatch):
    """Several batches: the loop writes a point's θ once per block of batches and runs the block;
    blocks of one batch (the budget at 0) and of all of them give the same values, which equal
    a hand computation over the whole dataset."""
    import importlib

    E = importlib.import_module("landscapes.evaluate")  # the package's `evaluate` is the function
    model = make_mlp()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (7, 5, 9)]
    metric = L.Loss(nn.CrossEntropyLoss(), batches)
    dirs = [L.random_direction(model, seed=s) for s in (0, 1)]
    axes = [np.linspace(-1, 1, 3)] * 2
    ev = E.Evaluator(model, metric, dirs, strategy="loop")
    assert [len(b) for b in ev._blocks(ev._groups[0], E.LOOP_BLOCK_BYTES)] == [3]
    assert [len(b) for b in ev._blocks(ev._groups[0], 0)] == [1, 1, 1]
    assert [len(b) for b in ev._blocks(ev._groups[0], 400)] == [2, 1]  # 224 + 160 bytes fit, + 288 do not
    together = L.evaluate(model, metric, dirs, axes, strategy="loop").values["loss"]
    monkeypatch.setattr(E, "LOOP_BLOCK_BYTES", 0)
    apart = L.evaluate(model, metric, dirs, axes, strategy="loop").values["loss"]
    np.testing.assert_allclose(together, apart, rtol=1e-6)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    want = landscape_reference(model, nn.CrossEntropyLoss(), x, y, dirs, axes)
    np.testing.assert_allclose(together, want, rtol=1e-5)
