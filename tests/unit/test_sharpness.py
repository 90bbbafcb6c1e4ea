"""Sharpness on quadratic losses with known Hessians, and read off a grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes.sharpness import average_sharpness, grid_sharpness, worst_case_sharpness
from tests.conftest import assert_unchanged, make_mlp, snapshot
from tests.reference.curvature_reference import dense_hessian


class Quadratic(nn.Module):
    """``½ (θ − c)ᵀ A (θ − c)`` for every sample: the Hessian is A, exactly."""

    def __init__(self, eigenvalues: list[float], seed: int = 0, at_minimum: bool = True):
        super().__init__()
        n = len(eigenvalues)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T)
        self.register_buffer("c", torch.randn(n, generator=g, dtype=torch.float64))
        start = self.c.clone() if at_minimum else self.c + torch.randn(n, generator=g, dtype=torch.float64)
        self.theta = nn.Parameter(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.theta - self.c
        return (0.5 * d @ self.A @ d).expand(x.shape[0])


def _mean(out, y):
    return out.mean()


DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
EIGS = [4.0, 2.5, 1.5, 1.0, 0.5, 0.25, -0.5, 0.1]


class TestAverage:
    @pytest.mark.parametrize("at_minimum", [True, False], ids=["minimum", "slope"])
    def test_quadratic(self, at_minimum):
        model = Quadratic(EIGS, at_minimum=at_minimum)
        before = snapshot(model)
        rho = 0.3
        est = average_sharpness(model, _mean, DATA, rho=rho, samples=64, seed=1)
        assert_unchanged(model, before)
        want = rho**2 * sum(EIGS) / (2 * len(EIGS))
        assert abs(est.value - want) <= 3 * est.stderr
        assert est.interval[0] < est.value < est.interval[1]
        assert est.kind == "average" and est.samples == 64 and est.evaluations == 1 + 2 * 64

    def test_linear_mse(self):
        """A linear model with MSE: H = 2XᵀX/(N·outputs) per output, from the dense reference."""
        torch.manual_seed(0)
        model = nn.Linear(5, 2).double()
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
        H, _ = dense_hessian(model, nn.MSELoss(), x, y)
        rho = 0.5
        est = average_sharpness(model, nn.MSELoss(), (x, y), rho=rho, samples=48)
        want = rho**2 * float(torch.trace(H)) / (2 * H.shape[0])
        assert abs(est.value - want) <= 3 * est.stderr
        assert est.relative == pytest.approx(est.value / est.loss)

    def test_adaptive_scales_by_theta(self):
        model = Quadratic([2.0, 2.0, 2.0, 2.0], seed=3)
        scale2 = model.theta.detach() ** 2
        rho = 0.1
        est = average_sharpness(model, _mean, DATA, rho=rho, samples=64, adaptive=True)
        want = rho**2 / (2 * 4) * float((torch.diag(model.A) * scale2).sum())
        assert abs(est.value - want) <= 3 * est.stderr

    def test_params_subset(self):
        model = make_mlp()
        before = snapshot(model)
        x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
        est = average_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.05, samples=4, params="4.*")
        assert_unchanged(model, before)
        assert math.isfinite(est.value)


class TestWorstCase:
    def test_quadratic_l2(self):
        model = Quadratic(EIGS)
        before = snapshot(model)
        rho = 0.2
        est = worst_case_sharpness(model, _mean, DATA, rho=rho, steps=30)
        assert_unchanged(model, before)
        assert est.value == pytest.approx(rho**2 * max(EIGS) / 2, rel=1e-3)
        assert est.samples == 30 and len(est.history) == 31 and math.isnan(est.stderr)

    def test_linf_box(self):
        """On a diagonal quadratic the ℓ∞ maximum is at a corner: ρ² tr(A) / 2 for A ⪰ 0."""
        model = Quadratic([3.0, 1.0, 0.5])
        with torch.no_grad():
            model.A.copy_(torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)))
        rho = 0.1
        est = worst_case_sharpness(model, _mean, DATA, rho=rho, norm="linf", steps=10)
        assert est.value == pytest.approx(rho**2 * 4.5 / 2, rel=1e-6)

    def test_adaptive_l2(self):
        model = Quadratic([1.0, 1.0, 1.0], seed=5)
        rho = 0.05
        t = model.theta.detach().abs()
        S = torch.diag(t)
        want = rho**2 * float(torch.linalg.eigvalsh(S @ model.A @ S).max()) / 2
        est = worst_case_sharpness(model, _mean, DATA, rho=rho, steps=40, adaptive=True)
        assert est.value == pytest.approx(want, rel=1e-3)

    def test_model_unchanged_after_failure(self):
        model = make_mlp(batchnorm=True)
        model[0].weight.requires_grad_(False)
        before = snapshot(model)
        calls = []

        def flaky(out, y):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("boom")
            return nn.functional.cross_entropy(out, y)

        with pytest.raises(RuntimeError, match="boom"):
            worst_case_sharpness(model, flaky, (torch.randn(8, 6), torch.randint(0, 3, (8,))), rho=0.1, model_mode="train")
        assert_unchanged(model, before)


class TestGrid:
    axes = [np.linspace(-1, 1, 5), np.linspace(-1, 1, 3)]

    def _values(self):
        x, y = np.meshgrid(*self.axes, indexing="ij")
        return 1.0 + x**2 + 3 * y**2

    def test_mean_rise_excluding_theta0(self):
        v = self._values()
        # within 0.6 of (0, 0): (±0.5, 0) only (y step is 1): rise 0.25
        assert grid_sharpness(v, self.axes, radius=0.6) == pytest.approx(0.25)
        assert grid_sharpness(v, self.axes, radius=0.6, relative=True) == pytest.approx(0.25)

    def test_no_neighbour_warns(self):
        with pytest.warns(L.LandscapesWarning, match="no grid point other than θ0 lies within radius=0.1"):
            assert math.isnan(grid_sharpness(self._values(), self.axes, radius=0.1))

    def test_relative_is_scale_free(self):
        v = self._values()
        a = grid_sharpness(v, self.axes, radius=1.2, relative=True)
        assert grid_sharpness(10 * v, self.axes, radius=1.2, relative=True) == pytest.approx(a)

    def test_nan_points_are_skipped(self):
        v = self._values()
        v[1, 1] = np.nan  # (-0.5, 0)
        assert grid_sharpness(v, self.axes, radius=0.6) == pytest.approx(0.25)

    @pytest.mark.parametrize(
        ("axes", "values", "kwargs", "match"),
        [
            pytest.param([np.linspace(0.5, 1, 3)], np.zeros(3), {"radius": 1.0}, r"axes\[0\] has no coordinate 0", id="no-theta0"),
            pytest.param([np.linspace(-1, 1, 3)], np.zeros(4), {"radius": 1.0}, r"values have shape \(4,\) but the axes give \(3,\)", id="shape"),
            pytest.param([np.linspace(-1, 1, 3)], np.zeros(3), {"radius": 0}, r"radius=0: expected a positive radius", id="radius"),
        ],
    )
    def test_bad_input(self, axes, values, kwargs, match):
        with pytest.raises(L.ConfigurationError, match=match):
            grid_sharpness(values, axes, **kwargs)


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        pytest.param(average_sharpness, {"rho": -1.0}, r"rho=-1.0: expected a positive radius", id="rho"),
        pytest.param(average_sharpness, {"rho": 0.1, "samples": 1}, r"samples=1: a standard error needs at least 2", id="samples"),
        pytest.param(worst_case_sharpness, {"rho": 0.1, "norm": "l1"}, r"norm='l1' is not an option", id="norm"),
        pytest.param(worst_case_sharpness, {"rho": 0.1, "lr": 0.0}, r"lr=0.0: expected a positive step length", id="lr"),
    ],
)
def test_bad_options(fn, kwargs, match):
    with pytest.raises(L.ConfigurationError, match=match):
        fn(Quadratic([1.0, 2.0]), _mean, DATA, **kwargs)
