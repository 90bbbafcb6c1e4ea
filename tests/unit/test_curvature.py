"""Curvature estimates against dense float64 Hessians (tests/reference/curvature_reference.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes.curvature import (
    DirectionalCurvature,
    LossGradient,
    curvature_summary,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    hessian_vector_product,
)
from tests.conftest import assert_unchanged, make_cnn, make_mlp, snapshot
from tests.reference.curvature_reference import dense_gradient, dense_hessian, spectrum

CE = nn.CrossEntropyLoss()


@dataclass
class _Out:
    logits: torch.Tensor


class DictNet(nn.Module):
    """Takes ``**batch`` (no labels) and returns an object with ``.logits``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> _Out:
        return _Out(self.head(torch.tanh(self.embed(features) * scale)))


def _data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _dict_batch(n: int = 30) -> dict[str, torch.Tensor]:
    x, y = _data(n, 5, 7)
    return {"features": x, "scale": torch.full((n, 1), 1.5), "labels": y}


def _case(kind: str):
    """(model, data as the library takes it, dense Hessian, its spectrum)."""
    if kind == "mlp":
        model = make_mlp()
        x, y = _data(50, 6, 123)
        H, _ = dense_hessian(model, CE, x, y)
        return model, (x, y), H
    if kind == "cnn_bn":
        model = make_cnn(batchnorm=True)
        x, y = _data(40, 16, 321)
        H, _ = dense_hessian(model, CE, x, y)
        return model, (x, y), H
    model = DictNet()
    batch = _dict_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    H, _ = dense_hessian(model, CE, inputs, batch["labels"], call=lambda m, b: m(**b), read=lambda o: o.logits)
    return model, batch, H


CASES = [pytest.param(k, id=k) for k in ("mlp", "cnn_bn", "dict")]
_CACHE: dict[str, tuple] = {}


def case(kind: str):
    if kind not in _CACHE:
        _CACHE[kind] = _case(kind)
    return _CACHE[kind]


def trained(kind: str):
    """The case's model after 50 full-batch Adam steps (near a minimum, as curvature is used),
    its data and dense Hessian."""
    key = "trained-" + kind
    if key not in _CACHE:
        model, (x, y), _ = case(kind)
        model = copy.deepcopy(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
        model.eval()
        _CACHE[key] = (model, (x, y), dense_hessian(model, CE, x, y)[0])
    return _CACHE[key]


def _flat(direction: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in direction.values()])


class TestEigenvalues:
    rel = 1e-3

    @pytest.mark.parametrize("kind", CASES)
    def test_both_ends_match_dense(self, kind):
        model, data, H = case(kind)
        before = snapshot(model)
        res = hessian_eigenvalues(model, CE, data, k=2, which="both")
        assert_unchanged(model, before)
        dense = spectrum(H)
        want = np.concatenate([dense[:2], dense[-2:]])
        got = res.eigenvalues.numpy()
        scale = np.abs(dense).max()
        np.testing.assert_allclose(got, want, rtol=self.rel, atol=self.rel * 1e-3 * scale)
        assert res.converged and res.hvps > 0 and len(res.eigenvectors) == 4
        for lam, vec in zip(got, res.eigenvectors, strict=True):
            v = _flat(vec)
            assert abs(float(v.norm()) - 1) < 1e-6
            rq = float(v @ H @ v)
            assert rq == pytest.approx(lam, rel=self.rel, abs=self.rel * 1e-3 * scale)
        assert set(res.eigenvectors[0]) == {n for n, _ in model.named_parameters()}

    @pytest.mark.parametrize("kind", CASES)
    def test_top_k(self, kind):
        model, data, H = case(kind)
        res = hessian_eigenvalues(model, CE, data, k=3, seed=5)
        np.testing.assert_allclose(res.eigenvalues.numpy(), spectrum(H)[:3], rtol=self.rel)

    def test_smallest(self):
        model, data, H = case("mlp")
        res = hessian_eigenvalues(model, CE, data, k=2, which="smallest")
        np.testing.assert_allclose(res.eigenvalues.numpy(), spectrum(H)[-2:], rtol=self.rel)
        assert res.eigenvalues[-1] < 0  # a saddle direction: "smallest" is algebraic

    def test_batching_changes_nothing(self):
        model, (x, y), _ = case("mlp")
        whole = hessian_eigenvalues(model, CE, (x, y), k=2, which="both")
        cuts = [(x[:17], y[:17]), (x[17:34], y[17:34]), (x[34:], y[34:])]  # unequal sizes
        batched = hessian_eigenvalues(model, CE, cuts, k=2, which="both")
        np.testing.assert_allclose(batched.eigenvalues.numpy(), whole.eigenvalues.numpy(), rtol=1e-5)

    def test_dataloader_with_dict_batches(self):
        model, batch, H = case("dict")
        loader = torch.utils.data.DataLoader(
            [{k: v[i] for k, v in batch.items()} for i in range(30)], batch_size=8
        )
        res = hessian_eigenvalues(model, CE, loader, k=1)
        assert res.eigenvalues[0].item() == pytest.approx(spectrum(H)[0], rel=1e-5)

    def test_both_methods_agree(self):
        model, data, H = case("mlp")
        a = hessian_eigenvalues(model, CE, data, k=1, hvp="func")
        b = hessian_eigenvalues(model, CE, data, k=1, hvp="double_backward")
        assert a.info["hvp_method"] == "torch.func" and b.info["hvp_method"] == "double_backward"
        assert a.eigenvalues[0].item() == pytest.approx(b.eigenvalues[0].item(), rel=1e-5)

    def test_auto_method_is_remembered_for_the_module(self):
        model, data, H = case("mlp")
        model = copy.deepcopy(model)  # a module no other test has decided for
        first = hessian_eigenvalues(model, CE, data, k=1)
        second = hessian_eigenvalues(model, CE, data, k=1)
        assert "earlier call" not in first.info["hvp_reason"]
        assert second.info["hvp_method"] == first.info["hvp_method"]
        assert second.info["hvp_reason"].endswith("(chosen at an earlier call on this module)")
        assert second.eigenvalues[0].item() == pytest.approx(spectrum(H)[0], rel=self.rel)

    def test_general_wrapper_uses_double_backward(self):
        model, (x, y), H = case("mlp")
        wrapper = L.GeneralModelWrapper(model, [model], lambda m, b: m(b))
        res = hessian_eigenvalues(wrapper, CE, (x, y), k=1)
        assert res.info["hvp_method"] == "double_backward"
        assert res.eigenvalues[0].item() == pytest.approx(spectrum(H)[0], rel=self.rel)

    def test_params_subset_is_the_block(self):
        model, (x, y), _ = case("mlp")
        names = ["4.weight", "4.bias"]
        H, _ = dense_hessian(model, CE, x, y, names=names)
        res = hessian_eigenvalues(model, CE, (x, y), k=2, params="4.*")
        np.testing.assert_allclose(res.eigenvalues.numpy(), spectrum(H)[:2], rtol=self.rel)
        assert res.info["num_parameters"] == H.shape[0]
        assert float(res.eigenvectors[0]["0.weight"].abs().max()) == 0  # outside the block

    def test_bn_statistics_are_reported(self):
        model, data, _ = case("cnn_bn")
        assert "running" in hessian_eigenvalues(model, CE, data, max_iter=5, tol=1.0).info["bn_statistics"]
        assert "none" in hessian_eigenvalues(make_mlp(), CE, _data(10, 6, 0), max_iter=5, tol=1.0).info["bn_statistics"]

    def test_train_mode_batch_statistics(self):
        model = make_mlp(batchnorm=True)
        x, y = _data(40, 6, 9)
        before = snapshot(model)
        res = hessian_eigenvalues(model, CE, (x, y), k=1, model_mode="train")
        assert_unchanged(model, before)  # running statistics are restored
        H, _ = dense_hessian(model, CE, x, y, train_bn=True)
        assert "batch statistics" in res.info["bn_statistics"]
        assert res.eigenvalues[0].item() == pytest.approx(spectrum(H)[0], rel=self.rel)

    def test_recompute_bn(self):
        model, data, _ = case("cnn_bn")
        before = snapshot(model)
        res = hessian_eigenvalues(model, CE, data, model_mode="recompute_bn", max_iter=5, tol=1.0)
        assert_unchanged(model, before)
        assert "re-estimated" in res.info["bn_statistics"]

    def test_not_converged_warns(self):
        model, data, _ = case("mlp")
        with pytest.warns(L.LandscapesWarning, match="not converged after 3"):
            res = hessian_eigenvalues(model, CE, data, k=1, max_iter=3)
        assert not res.converged and res.hvps == 3

    def test_tolerance_is_relative_to_each_eigenvalue(self):
        # H = diag(2·s²) of a least-squares fit: λ from 200 down to 4.5, so λmin is 44× smaller
        # than λmax; its residual must be within tol of its own size (the old rule, relative to
        # the largest |λ|, let it stop at a residual 44× larger).
        s = torch.cat([torch.tensor([10.0]), torch.linspace(3.0, 1.5, 60)])
        net = nn.Linear(61, 1, bias=False, dtype=torch.float64)
        x = torch.diag(s).double() * (61 ** 0.5)
        res = hessian_eigenvalues(net, nn.MSELoss(), (x, torch.zeros(61, 1, dtype=torch.float64)), k=1, which="both", tol=1e-3)
        np.testing.assert_allclose(res.eigenvalues.numpy(), [200.0, 4.5], rtol=1e-3)
        assert (res.residuals <= 1e-3 * res.eigenvalues.abs()).all(), (res.residuals, res.eigenvalues)

    def test_tiny_hessian_exhausts_the_space(self):
        net = nn.Linear(2, 1, bias=False)
        x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        res = hessian_eigenvalues(net, nn.MSELoss(), (x, torch.zeros(2, 1)), k=1, which="both")
        np.testing.assert_allclose(res.eigenvalues.numpy(), [4.0, 1.0], rtol=1e-6)


class _SquareBackward(torch.autograd.Function):
    """The backward of x², like an aten op whose own derivative is not implemented."""

    @staticmethod
    def forward(ctx, x, g):
        return 2 * x * g

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("derivative for square_backward is not implemented")


class _SquareFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _SquareBackward.apply(x, g)


class _Square(nn.Module):
    def forward(self, x):
        return _SquareFn.apply(x)


class TestFailures:
    def test_module_without_double_backward_is_named(self):
        model = nn.Sequential(nn.Linear(6, 4), _Square(), nn.Linear(4, 3)).eval()
        model[0].weight.requires_grad_(False)  # the guard checks it comes back
        before = snapshot(model)
        with pytest.raises(L.DifferentiationError, match=r"module '1' \(_Square\)"):
            hessian_eigenvalues(model, CE, _data(10, 6, 0), k=1)
        assert_unchanged(model, before)

    def test_failing_loss_leaves_model_unchanged(self):
        model = make_mlp(batchnorm=True)
        before = snapshot(model)

        def bad(out, y):
            raise RuntimeError("loss exploded")

        with pytest.raises(RuntimeError, match="loss exploded"):
            hessian_eigenvalues(model, bad, _data(10, 6, 0), model_mode="train", hvp="double_backward")
        assert_unchanged(model, before)

    def test_detached_output(self):
        class Detach(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 3)

            def forward(self, x):
                return self.fc(x).detach()

        with pytest.raises(L.DifferentiationError, match="does not depend on the parameters"):
            hessian_eigenvalues(Detach(), CE, _data(10, 6, 0), hvp="double_backward")

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            pytest.param({"k": 0}, r"k=0: expected a positive integer", id="k"),
            pytest.param({"k": 400}, r"asks for 400 eigenpairs, but the Hessian is 355", id="k-large"),
            pytest.param({"which": "top"}, r"which='top' is not an option", id="which"),
            pytest.param({"params": "conv.*"}, r"params pattern 'conv\.\*' matches no parameter", id="params"),
            pytest.param({"tol": 0}, r"tol=0: expected a positive number", id="tol"),
            pytest.param({"model_mode": "test"}, r"model_mode='test' is not an option", id="mode"),
            pytest.param({"seed": 1.5}, r"seed=1.5: expected an integer", id="seed"),
        ],
    )
    def test_bad_options(self, kwargs, match):
        with pytest.raises(L.ConfigurationError, match=match):
            hessian_eigenvalues(make_mlp(), CE, _data(10, 6, 0), **kwargs)

    def test_bad_deflate(self):
        with pytest.raises(L.ConfigurationError, match=r"deflate=-1: expected a count ≥ 0"):
            hessian_spectrum(make_mlp(), CE, _data(10, 6, 0), deflate=-1)

    def test_tensor_data(self):
        with pytest.raises(L.ConfigurationError, match=r"data is a Tensor; pass an \(inputs, target\) pair"):
            hessian_trace(make_mlp(), CE, torch.zeros(3, 6))

    def test_hutchpp_needs_three(self):
        with pytest.raises(L.ConfigurationError, match="probes=2: hutch\\+\\+ needs at least 3"):
            hessian_trace(make_mlp(), CE, _data(10, 6, 0), probes=2)


class TestTrace:
    @pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
    def test_interval_covers_exact_trace(self, method):
        model, data, H = case("mlp")
        exact = float(torch.trace(H))
        covered = 0
        for seed in range(10):
            est = hessian_trace(model, CE, data, probes=30, method=method, seed=seed)
            lo, hi = est.interval
            covered += lo <= exact <= hi
            assert est.probes == 30 and est.stderr > 0
        assert covered >= 9

    def test_hutchpp_beats_hutchinson(self):
        model, data, H = case("dict")
        a = hessian_trace(model, CE, data, probes=30, method="hutch++")
        b = hessian_trace(model, CE, data, probes=30, method="hutchinson")
        assert a.stderr < b.stderr


class TestSpectrum:
    @pytest.mark.parametrize("kind", CASES)
    def test_quadrature_is_exact_per_probe(self, kind):
        """Each probe's nodes and weights reproduce vᵀHᵏv (k ≤ 3) of the dense Hessian: Gauss
        quadrature with m ≥ 2 nodes is exact to degree 2m − 1."""
        model, data, H = case(kind)
        n = H.shape[0]
        dens = hessian_spectrum(model, CE, data, probes=3, steps=8, seed=4, deflate=0)
        gen = torch.Generator().manual_seed(4)  # the documented probe draws
        for p in range(3):
            v = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1) / n**0.5
            Hv = H @ v
            want = [1.0, float(v @ Hv), float(Hv @ Hv), float(Hv @ H @ Hv)]
            got = [float(np.sum(dens.weights[p] * dens.nodes[p] ** k)) for k in range(4)]
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)

    @pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ("mlp", "cnn_bn")])
    def test_moments_within_five_percent_near_a_minimum(self, kind):
        """Default probes (10) and deflation (20 exact pairs), one fixed seed: both moments within
        5 %, and with standard errors small enough that this is no luck of the seed. (Gauss
        quadrature with 4 nodes is exact to degree 7: more steps change no moment ≤ 2.)"""
        model, data, H = trained(kind)
        n = H.shape[0]
        dens = hessian_spectrum(model, CE, data, steps=4, seed=0)
        assert dens.deflated == 20 and dens.nodes.shape == (10, 24)
        np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, rtol=1e-12)
        exact = {1: float(torch.trace(H)) / n, 2: float((H * H).sum()) / n}
        for k, want in exact.items():
            assert dens.moment(k) == pytest.approx(want, rel=0.05), k
            se = dens.moments(k).std(ddof=1) / np.sqrt(10)
            assert 2 * se <= 0.05 * abs(want), k
        # the deflated nodes are the 20 eigenvalues of largest |λ|
        dense = spectrum(H)
        top = np.sort(dense[np.argsort(-np.abs(dense))[:20]])
        np.testing.assert_allclose(np.sort(dens.nodes[0, :20]), top, atol=1e-3 * np.abs(dense).max())

    @pytest.mark.parametrize("kind", CASES)
    def test_moments_at_random_initialization(self, kind):
        """An indefinite Hessian at initialization: ‖H‖²_F/n within 5 %; the mean eigenvalue is a
        near-cancellation (tr H/n is 0.8 % of the RMS eigenvalue on the MLP: a Rademacher probe's
        relative standard deviation is 0.4–1.5 even after deflation), so it is checked against
        its standard error only."""
        model, data, H = case(kind)
        n = H.shape[0]
        dens = hessian_spectrum(model, CE, data, probes=30, steps=4, seed=0)
        exact = {1: float(torch.trace(H)) / n, 2: float((H * H).sum()) / n}
        assert dens.moment(2) == pytest.approx(exact[2], rel=0.05)
        for k, want in exact.items():
            se = dens.moments(k).std(ddof=1) / np.sqrt(30)
            assert abs(dens.moment(k) - want) <= 3 * se
        assert dens.lambda_max == pytest.approx(spectrum(H)[0], rel=1e-3)  # deflated: exact

    def test_density_integrates_to_one(self):
        model, data, H = case("mlp")
        dens = hessian_spectrum(model, CE, data, probes=2, steps=20)
        grid = np.linspace(dens.lambda_min - 1, dens.lambda_max + 1, 4001)
        d = dens.density(grid, sigma=0.05)
        assert np.trapezoid(d, grid) == pytest.approx(1.0, rel=1e-3)

    def test_weights_are_first_components(self):
        """On a Hessian with two distinct eigenvalues the quadrature is exact: a unit v puts
        mass ‖P₁v‖² on λ₁ (PyHessian before its PR #23 used other components)."""
        net = nn.Linear(2, 1, bias=False)
        x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        dens = hessian_spectrum(net, nn.MSELoss(), (x, torch.zeros(2, 1)), probes=1, steps=2, deflate=0)
        row = dens.weights[0][np.argsort(dens.nodes[0])]
        np.testing.assert_allclose(np.sort(dens.nodes[0]), [1.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(row, [0.5, 0.5], rtol=1e-6)  # Rademacher/√2: half on each


def test_summary():
    model, data, H = case("mlp")
    before = snapshot(model)
    s = curvature_summary(model, CE, data, trace_probes=30, spectrum_probes=4, steps=30)
    assert_unchanged(model, before)
    dense = spectrum(H)
    assert s.lambda_max == pytest.approx(dense[0], rel=1e-3)
    assert s.lambda_min == pytest.approx(dense[-1], rel=1e-3)
    assert s.eigen_ratio == pytest.approx(abs(dense[-1] / dense[0]), rel=2e-3)
    lo, hi = s.trace_interval
    assert lo <= float(torch.trace(H)) <= hi
    assert 0 <= s.negative_mass <= 1
    assert set(s.metrics()) == {"lambda_max", "lambda_min", "trace", "trace_stderr", "eigen_ratio", "negative_mass", "hvps"}


def test_hessian_vector_product_matches_dense():
    model, (x, y), H = case("mlp")
    v = L.random_direction(model, seed=4)
    hv = hessian_vector_product(model, CE, (x, y), v)
    np.testing.assert_allclose(_flat(hv).numpy(), (H @ _flat(v)).numpy(), rtol=1e-4, atol=1e-6)


def test_products_on_one_batch_reuse_the_gradient_graph_and_stay_exact():
    """One batch at θ0: the products after the first reuse the gradient's graph (one backward
    each); every product stays H·v, also after the parameters moved for a value elsewhere."""
    from landscapes.curvature import _objective

    model, (x, y), H = case("mlp")
    obj = _objective(model, CE, (x, y), "test", hvp="double_backward")
    with obj.session():
        vs = [_flat(L.random_direction(model, seed=s)) for s in (4, 5, 6)]
        first = obj.hvp(vs[0])
        assert obj._graph is not None
        graph = obj._graph
        second = obj.hvp(vs[1])
        assert obj._graph is graph  # reused, not rebuilt
        obj.value(obj.theta0 + 0.1 * vs[2].float())  # moves the parameters: the graph is dropped
        assert obj._graph is None
        third = obj.hvp(vs[2])
    assert obj._graph is None  # not kept beyond the session
    for got, v in zip((first, second, third), vs, strict=True):
        np.testing.assert_allclose(got.numpy(), (H @ v).numpy(), rtol=1e-4, atol=1e-6)


class TestGridMetrics:
    def test_loss_gradient(self):
        model, (x, y), _ = case("mlp")
        before = snapshot(model)
        got = LossGradient(CE, x, y)(model)
        assert_unchanged(model, before)
        assert got == pytest.approx(float(dense_gradient(model, CE, x, y).norm()), rel=1e-5)

    def test_directional_curvature(self):
        model, (x, y), H = case("mlp")
        d = L.random_direction(model, seed=1)
        got = DirectionalCurvature(CE, x, y, direction=d)(model)
        v = _flat(d)
        assert got == pytest.approx(float(v @ H @ v / (v @ v)), rel=1e-4)

    def test_on_a_grid(self):
        """Through the engine's loop path: at θ0 (coordinate 0) the values are θ0's."""
        model, (x, y), H = case("mlp")
        d = L.random_direction(model, seed=1)
        metrics = [L.Loss(CE, x, y), LossGradient(CE, x, y), DirectionalCurvature(CE, x, y, direction=d)]
        before = snapshot(model)
        land = L.evaluate(model, metrics, [d], [np.array([-0.5, 0.0, 0.5])])
        assert_unchanged(model, before)
        grad = land.values["grad_norm"]
        curv = land.values["curvature"]
        assert grad[1] == pytest.approx(float(dense_gradient(model, CE, x, y).norm()), rel=1e-5)
        v = _flat(d)
        assert curv[1] == pytest.approx(float(v @ H @ v / (v @ v)), rel=1e-4)
        assert np.all(np.isfinite(grad)) and grad[0] != grad[1]


def test_benchmark_power_iteration_finds_the_top_two():
    """The PyHessian-style comparison of benchmarks/curvature.py, on a known diagonal Hessian."""
    from benchmarks.curvature import power_iteration

    d = torch.tensor([5.0, 3.0, 1.0, 0.5, -0.2], dtype=torch.float64)
    values, products = power_iteration(lambda v: d * v, 5, top_n=2, seed=0)
    np.testing.assert_allclose(values, [5.0, 3.0], rtol=1e-2)
    assert 2 < products <= 200
