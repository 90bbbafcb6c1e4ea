"""Directions: Gaussian draws, normalization norms, bias zeroing, seeds, between models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from landscapes import direction_between, orthogonalize, random_direction
from landscapes.directions import normalize_direction
from tests.conftest import make_cnn, make_mlp
from tests.reference.landscape_reference import filter_normalize_reference

TOL = 1e-5


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("model", [pytest.param(make_mlp(), id="mlp"), pytest.param(make_cnn(batchnorm=True), id="cnn-bn")])
def test_filter_normalization_matches_reference(model: nn.Module) -> None:
    raw = random_direction(model, normalization=None, ignore=None, seed=3)
    d = random_direction(model, normalization="filter", ignore="biasbn", seed=3)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, f"{name} should be zeroed"
            continue
        want = filter_normalize_reference(_np(raw[name]), _np(p))
        np.testing.assert_allclose(_np(d[name]), want, rtol=TOL, atol=1e-7)
        got = np.linalg.norm(_np(d[name]).reshape(p.shape[0], -1), axis=1)
        np.testing.assert_allclose(got, np.linalg.norm(_np(p).reshape(p.shape[0], -1), axis=1), rtol=TOL)


def test_layer_normalization_norms(mlp: nn.Module) -> None:
    d = random_direction(mlp, normalization="layer", ignore=None, seed=1)
    for name, p in mlp.named_parameters():
        assert np.linalg.norm(_np(d[name])) == pytest.approx(np.linalg.norm(_np(p)), rel=TOL)


@pytest.mark.parametrize("ignore", ["biasbn", None])
def test_model_normalization_is_one_factor(mlp: nn.Module, ignore: str | None) -> None:
    raw = random_direction(mlp, normalization=None, ignore=None, seed=2)
    d = random_direction(mlp, normalization="model", ignore=ignore, seed=2)
    kept = [n for n, p in mlp.named_parameters() if ignore is None or p.dim() > 1]
    factors = {n: _np(d[n]) / _np(raw[n]) for n in kept}
    one = next(iter(factors.values())).reshape(-1)[0]
    for f in factors.values():
        np.testing.assert_allclose(f, one, rtol=TOL)
    d_norm = np.sqrt(sum((_np(d[n]) ** 2).sum() for n in kept))
    p_norm = np.sqrt(sum((_np(p) ** 2).sum() for n, p in mlp.named_parameters() if n in kept))
    assert d_norm == pytest.approx(p_norm, rel=TOL)


def test_filter_normalization_keeps_1d_tensors_when_not_ignored(mlp: nn.Module) -> None:
    d = random_direction(mlp, normalization="filter", ignore=None, seed=0)
    bias = dict(mlp.named_parameters())["0.bias"]
    assert np.linalg.norm(_np(d["0.bias"])) == pytest.approx(np.linalg.norm(_np(bias)), rel=TOL)


def test_all_zero_filters_give_zero_not_nan() -> None:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[1].zero_()
    d = random_direction(model, normalization="filter", seed=0)
    assert torch.isfinite(d["weight"]).all()
    assert torch.count_nonzero(d["weight"][1]) == 0
    zero_dir = normalize_direction({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, model)
    assert torch.isfinite(zero_dir["weight"]).all() and torch.count_nonzero(zero_dir["weight"]) == 0


def test_raw_draws_are_standard_normal_from_the_seed(mlp: nn.Module) -> None:
    raw = random_direction(mlp, normalization=None, ignore=None, seed=7)
    n = sum(p.numel() for p in mlp.parameters())
    want = torch.randn(n, generator=torch.Generator().manual_seed(7))
    got = torch.cat([raw[name].reshape(-1) for name, _ in mlp.named_parameters()])
    assert torch.equal(got, want)


def test_seed_reproducibility_and_independence(mlp: nn.Module) -> None:
    a = random_direction(mlp, seed=5)
    b = random_direction(mlp, seed=5)
    c = random_direction(mlp, seed=6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert list(a) == [n for n, _ in mlp.named_parameters()]


def test_same_seed_same_draws_whatever_the_normalization(mlp: nn.Module) -> None:
    layer = random_direction(mlp, normalization="layer", ignore=None, seed=9)
    filt = random_direction(mlp, normalization="filter", ignore=None, seed=9)
    # both rescale the same raw draw: the signs agree everywhere
    assert torch.equal(torch.sign(layer["2.weight"]), torch.sign(filt["2.weight"]))


def test_direction_between_and_orthogonalize(mlp: nn.Module) -> None:
    other = make_mlp(seed=1)
    d = direction_between(mlp, other)
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(d[name], dict(other.named_parameters())[name] - p)
    d1 = random_direction(mlp, seed=0)
    d2 = {n: t + 0.5 * d1[n] for n, t in random_direction(mlp, seed=1).items()}
    result = orthogonalize(d1, d2)
    f1 = torch.cat([d1[n].reshape(-1) for n in d1]).double()
    f2 = torch.cat([d2[n].reshape(-1) for n in d2]).double()
    fo = torch.cat([result.direction[n].reshape(-1) for n in d2]).double()
    assert result.cosine_before == pytest.approx(float(f1 @ f2 / (f1.norm() * f2.norm())), rel=1e-9)
    assert abs(result.cosine_after) < 1e-6
    assert float(fo @ f1 / (fo.norm() * f1.norm())) == pytest.approx(0.0, abs=1e-6)
    assert float(fo.norm()) == pytest.approx(float(f2.norm()), rel=1e-6)
