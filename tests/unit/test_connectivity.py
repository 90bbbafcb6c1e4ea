"""Barriers on hand-built arrays; linear paths and Bézier curves between small trained models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes import ConfigurationError, ShapeMismatchError
from landscapes.connectivity import (
    BezierCurve,
    PathValues,
    barrier,
    evaluate_curve,
    fit_bezier,
    linear_path,
)
from landscapes.errors import LandscapesWarning
from tests.conftest import assert_unchanged, make_cnn, make_mlp, snapshot


class Tol:
    VALUE = 1e-6


# --------------------------------------------------------------------------- barrier
BARRIERS = [
    # values, t, frankle, entezari, t_frankle, t_entezari
    pytest.param([1.0, 3.0, 2.0], [0.0, 0.5, 1.0], 1.5, 1.5, 0.5, 0.5, id="bump"),
    # line from 0 to 2 is 2t: excess (0, 0.5, -0.3, 0); max 2 at t=1 minus mean 1
    pytest.param([0.0, 1.0, 1.2, 2.0], [0.0, 0.25, 0.75, 1.0], 1.0, 0.5, 1.0, 0.25, id="uneven-ends"),
    pytest.param([1.0, 0.5, 1.0], None, 0.0, 0.0, 0.0, 0.0, id="convex-no-barrier"),
    pytest.param([2.0, 2.0], [0.0, 1.0], 0.0, 0.0, 0.0, 0.0, id="ends-only"),
]


@pytest.mark.parametrize("values, t, frankle, entezari, t_f, t_e", BARRIERS)
def test_barrier_known_answers(values, t, frankle, entezari, t_f, t_e):
    b = barrier(np.array(values), t)
    assert b.frankle == pytest.approx(frankle, abs=1e-12)
    assert b.entezari == pytest.approx(entezari, abs=1e-12)
    assert (b.t_frankle, b.t_entezari) == (t_f, t_e)
    assert (b.start, b.end) == (values[0], values[-1])


def test_error_barrier_from_accuracy():
    t = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    path = PathValues(
        t=t,
        values={"loss": np.array([0.1, 0.9, 0.5, 0.3]), "accuracy": np.array([1.0, 0.6, 0.8, 0.9])},
        accuracy=("accuracy",),
    )
    out = path.barriers()
    assert set(out) == {"loss", "error"}
    # error (0, .4, .2, .1): max .4 − mean .05; line .1t, excess at 1/3: .4 − .1/3
    assert out["error"].frankle == pytest.approx(0.35)
    assert out["error"].entezari == pytest.approx(0.4 - 0.1 / 3)
    assert out["loss"].frankle == pytest.approx(0.9 - 0.2)
    assert out["loss"].entezari == pytest.approx(0.9 - (0.1 + (0.3 - 0.1) / 3))


BAD_BARRIERS = [
    pytest.param([1.0, 2.0], [0.0, 0.9], ConfigurationError, "exactly 0 to exactly 1", id="t-not-to-1"),
    pytest.param([1.0, 2.0, 3.0], [0.0, 0.7, 0.5], ConfigurationError, "increase strictly", id="t-unsorted"),
    pytest.param([1.0, np.nan], None, ConfigurationError, "NaN or inf", id="nan"),
    pytest.param([1.0], None, ConfigurationError, "two end points", id="one-point"),
    pytest.param([[1.0, 2.0]], None, ShapeMismatchError, "1-D", id="2d"),
    pytest.param([1.0, 2.0], [0.0, 0.5, 1.0], ShapeMismatchError, "one t per value", id="lengths"),
]


@pytest.mark.parametrize("values, t, error, match", BAD_BARRIERS)
def test_barrier_bad_input(values, t, error, match):
    with pytest.raises(error, match=match):
        barrier(values, t)


# --------------------------------------------------------------------------- trained models
def _train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 200, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train ~20× faster on one thread than on two busy cores; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from pipelines.demo import load_digits_tensors

    return load_digits_tensors()


@pytest.fixture(scope="module")
def two_minima(digits):
    x, y = digits
    return _train(x, y, seed=0), _train(x, y, seed=1)


def _metrics(x, y):
    return [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]


def test_linear_path_ends_are_the_models_own_values(two_minima, digits):
    a, b = two_minima
    x, y = digits
    before_a, before_b = snapshot(a), snapshot(b)
    path = linear_path(a, b, _metrics(x, y), steps=11)
    assert_unchanged(a, before_a)
    assert_unchanged(b, before_b)
    assert path.t[0] == 0.0 and path.t[-1] == 1.0 and len(path.t) == 11
    for m in (L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)):
        assert path.values[m.name][0] == m(a)
        assert path.values[m.name][-1] == m(b)
    # a middle point against the obvious reference: a copy holding (1 − t)θa + tθb
    ref = copy.deepcopy(a)
    with torch.no_grad():
        for (_, p), pa, pb in zip(ref.named_parameters(), a.parameters(), b.parameters(), strict=True):
            p.copy_(0.7 * pa + 0.3 * pb)
    assert path.values["loss"][3] == pytest.approx(L.Loss(nn.CrossEntropyLoss(), x, y)(ref), rel=Tol.VALUE)
    barriers = path.barriers()
    assert barriers["loss"].frankle > 0.1 and barriers["error"].entezari > 0.01


def test_straight_bezier_equals_linear_path(two_minima, digits):
    a, b = two_minima
    x, y = digits
    line = linear_path(a, b, _metrics(x, y), steps=9)
    curve = evaluate_curve(BezierCurve.through(a, b), a, _metrics(x, y), steps=9)
    np.testing.assert_array_equal(curve.t, line.t)
    np.testing.assert_allclose(curve.values["loss"], line.values["loss"], rtol=Tol.VALUE)
    assert curve.values["loss"][0] == line.values["loss"][0]
    assert curve.values["loss"][-1] == line.values["loss"][-1]


def test_fitted_bezier_has_lower_barrier_and_exact_ends(two_minima, digits):
    a, b = two_minima
    x, y = digits
    before_a, before_b = snapshot(a), snapshot(b)
    rng = torch.get_rng_state()
    curve = fit_bezier(a, b, nn.CrossEntropyLoss(), (x, y), steps=150, lr=0.01, optimizer="adam", seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's random state changed"
    assert_unchanged(a, before_a)
    assert_unchanged(b, before_b)
    for n, p in a.named_parameters():
        assert torch.equal(curve.start[n], p) and torch.equal(curve.point(0.0)[n], p)
    for n, p in b.named_parameters():
        assert torch.equal(curve.end[n], p) and torch.equal(curve.point(1.0)[n], p)
    assert set(curve.bend) == {n for n, _ in a.named_parameters()}
    assert curve.losses.shape == (150,) and np.isfinite(curve.losses).all()

    line = linear_path(a, b, _metrics(x, y), steps=21).barriers()
    bent = evaluate_curve(curve, a, _metrics(x, y), steps=21)
    assert bent.values["loss"][0] == L.Loss(nn.CrossEntropyLoss(), x, y)(a)
    assert bent.values["loss"][-1] == L.Loss(nn.CrossEntropyLoss(), x, y)(b)
    got = bent.barriers()
    assert got["loss"].frankle < 0.5 * line["loss"].frankle
    assert got["loss"].entezari < 0.5 * line["loss"].entezari
    assert got["error"].entezari < line["error"].entezari

    # same seed, same curve; the bend loads into the model as a state dict
    again = fit_bezier(a, b, nn.CrossEntropyLoss(), (x, y), steps=150, lr=0.01, optimizer="adam", seed=0)
    assert all(torch.equal(again.bend[n], curve.bend[n]) for n in curve.bend)
    mid = copy.deepcopy(a)
    mid.load_state_dict(curve.bend, strict=False)
    assert all(torch.equal(p, curve.bend[n]) for n, p in mid.named_parameters())


def test_fit_bezier_reduces_the_loss_at_the_middle_quickly(digits):
    """Fast version: two tiny models, a few SGD steps on a DataLoader; the loss near t = 0.5 drops."""
    x, y = digits
    x, y = x[:256], y[:256]
    a, b = _train(x, y, seed=0, steps=60, hidden=8), _train(x, y, seed=1, steps=60, hidden=8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    before = snapshot(a)
    curve = fit_bezier(a, b, nn.CrossEntropyLoss(), loader, steps=40, lr=0.05, seed=1)
    assert_unchanged(a, before)
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    mid_line = evaluate_curve(BezierCurve.through(a, b), a, loss, steps=3).values["loss"][1]
    mid_curve = evaluate_curve(curve, a, loss, steps=3).values["loss"][1]
    assert mid_curve < mid_line


def test_batchnorm_paths_recompute_statistics_and_leave_models_unchanged(image_data):
    x, y = image_data
    a, b = make_cnn(seed=0, batchnorm=True), make_cnn(seed=1, batchnorm=True)
    before_a, before_b = snapshot(a), snapshot(b)
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    with pytest.warns(LandscapesWarning, match="recompute_bn"):
        linear_path(a, b, loss, steps=3)
    path = linear_path(a, b, loss, steps=5, model_mode="recompute_bn")
    curve = fit_bezier(a, b, nn.CrossEntropyLoss(), (x, y), steps=5, lr=0.01, batch_size=16)
    bent = evaluate_curve(curve, a, loss, steps=5, model_mode="recompute_bn")
    assert_unchanged(a, before_a)
    assert_unchanged(b, before_b)
    # t = 1: b's parameters with statistics re-estimated on the data (the obvious reference)
    ref = copy.deepcopy(b)
    L.recalibrate_bn(ref, [x])
    assert path.values["loss"][-1] == pytest.approx(loss(ref), rel=Tol.VALUE)
    assert bent.values["loss"][-1] == pytest.approx(loss(ref), rel=Tol.VALUE)


BAD_CALLS = [
    pytest.param(lambda a, b, d: linear_path(a, b, d, steps=1), ConfigurationError, "steps=1", id="steps"),
    pytest.param(
        lambda a, b, d: linear_path(a, make_cnn(), d), ShapeMismatchError, "model_b lacks", id="architecture"
    ),
    pytest.param(
        lambda a, b, d: fit_bezier(a, b, nn.MSELoss(), ([], []), steps=1), ConfigurationError, "data is a", id="data"
    ),
    pytest.param(
        lambda a, b, d: fit_bezier(a, b, nn.MSELoss(), d, lr=0), ConfigurationError, "lr=0", id="lr"
    ),
    pytest.param(
        lambda a, b, d: fit_bezier(a, b, nn.MSELoss(), d, optimizer="lbfgs"), ConfigurationError,
        "optimizer='lbfgs'", id="optimizer",
    ),
    pytest.param(
        lambda a, b, d: BezierCurve.through(a, b).point(1.5), ConfigurationError, "outside", id="t-range"
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_calls(call, error, match, data):
    a, b = make_mlp(0), make_mlp(1)
    x, y = data
    arg = L.Loss(nn.CrossEntropyLoss(), x, y) if "linear_path" in repr(call.__code__.co_names) else (x, y)
    with pytest.raises(error, match=match):
        call(a, b, arg)


def test_fit_bezier_reports_divergence(data):
    x, y = data
    with pytest.raises(L.EvaluationError, match="lower lr"):
        fit_bezier(make_mlp(0), make_mlp(1), lambda out, _: out.sum() * float("inf"), (x, y), steps=3)


class _Pair(nn.Module):
    """A model whose output is a tuple, called on a mapping batch: the adapters' case."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(pixels)
        return out, out.sum()


def test_fit_bezier_through_adapters_equals_the_plain_fit(digits):
    x, y = digits
    x, y = x[:128], y[:128]
    a, b = _train(x, y, seed=0, steps=20, hidden=8), _train(x, y, seed=1, steps=20, hidden=8)
    plain = fit_bezier(a, b, nn.CrossEntropyLoss(), (x, y), steps=5, seed=3, batch_size=32)
    pa, pb = _Pair(copy.deepcopy(a)), _Pair(copy.deepcopy(b))
    loader = [({"pixels": x[i : i + 32]}, y[i : i + 32]) for i in range(0, 128, 32)]
    adapted = fit_bezier(pa, pb, nn.CrossEntropyLoss(), loader, steps=5, seed=3, forward="kwargs", output=0)
    assert set(adapted.bend) == {f"net.{n}" for n in plain.bend}
    moved = [not torch.equal(adapted.bend[f"net.{n}"], (plain.start[n] + plain.end[n]) / 2) for n in plain.bend]
    assert all(moved)  # trained through the adapters
    again = fit_bezier(pa, pb, nn.CrossEntropyLoss(), loader, steps=5, seed=3, forward="kwargs", output=0)
    for n in adapted.bend:
        assert torch.equal(adapted.bend[n], again.bend[n])  # seeded: the same fit again
