"""PCA directions of a trajectory and projection onto its plane, against numpy in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscapes import ConfigurationError, ShapeMismatchError, normalize_direction
from landscapes.params import ParameterSpace
from landscapes.trajectory import PCADirections, pca_directions, project_trajectory
from tests.conftest import assert_unchanged, make_cnn, make_mlp, snapshot


class Tol:
    DIRECTION = 1e-5
    RATIO = 1e-8
    EXACT = 1e-10


def _trajectory(model: torch.nn.Module, m: int = 6, seed: int = 0, dtype=torch.float32) -> list[dict]:
    """A random walk from ``model``'s parameters, drifting (so there is a trend)."""
    g = torch.Generator().manual_seed(seed)
    state = {n: p.detach().clone().to(dtype) for n, p in model.named_parameters()}
    drift = {n: torch.randn(t.shape, generator=g, dtype=dtype) * 0.05 for n, t in state.items()}
    out = []
    for _ in range(m):
        state = {n: t + drift[n] + torch.randn(t.shape, generator=g, dtype=dtype) * 0.02 for n, t in state.items()}
        out.append(state)
    return out


def _flat(d: dict, names) -> np.ndarray:
    return np.concatenate([d[n].detach().double().reshape(-1).numpy() for n in names])


def _numpy_pca(states, ref, names, kinds, ignore, center):
    """The obvious reference: stack, zero ignored columns, (center,) SVD."""
    x = np.stack([_flat(s, names) - _flat(ref, names) for s in states])
    if ignore == "biasbn":
        mask = np.concatenate([np.full(np.prod(s.shape, dtype=int), k == "weight") for s, k in kinds])
        x = x * mask
    if center:
        x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return s, vt, float((x**2).sum())


CASES = [
    pytest.param("last", False, "biasbn", "svd", id="last-uncentered-biasbn-svd"),
    pytest.param("last", False, "biasbn", "gram", id="last-uncentered-biasbn-gram"),
    pytest.param("last", True, None, "gram", id="last-centered-all-gram"),
    pytest.param(0, True, "biasbn", "svd", id="first-centered-svd"),
    pytest.param(2, False, None, "auto", id="middle-uncentered-auto"),
    pytest.param("state", False, "biasbn", "gram", id="external-reference"),
]


@pytest.mark.parametrize("reference, center, ignore, method", CASES)
@pytest.mark.parametrize("make", [make_mlp, lambda: make_cnn(batchnorm=True)], ids=["mlp", "cnn-bn"])
def test_directions_equal_numpy_svd(make, reference, center, ignore, method):
    model = make()
    states = _trajectory(model, m=6)
    space = ParameterSpace.from_module(model)
    names = space.names
    kinds = [(s, s.kind) for s in space.specs]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()} if reference == "state" else None
    ref_arg = ref if reference == "state" else reference
    ref_state = ref if reference == "state" else states[reference if isinstance(reference, int) else -1]

    before = snapshot(model)
    pca = pca_directions(
        states, reference=ref_arg, k=3, ignore=ignore, center=center, model=model, method=method
    )
    assert_unchanged(model, before)

    s, vt, total = _numpy_pca(states, ref_state, names, kinds, ignore, center)
    assert isinstance(pca, PCADirections) and len(pca.directions) == 3
    for j, d in enumerate(pca.directions):
        got = _flat(d, names)
        sign = np.sign(got @ vt[j])
        np.testing.assert_allclose(sign * got, vt[j], atol=Tol.DIRECTION, rtol=0)
        assert set(d) == set(names) and all(d[n].shape == ref_state[n].shape for n in names)
    np.testing.assert_allclose(pca.singular_values, s[:3], rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio, s[:3] ** 2 / total, rtol=1e-6, atol=Tol.RATIO)
    assert pca.explained_variance_ratio.sum() <= 1 + 1e-12
    np.testing.assert_allclose(pca.explained_variance, s[:3] ** 2 / (len(states) - (1 if center else 0)), rtol=1e-6)
    for n, t in pca.origin.items():
        assert torch.equal(t, ref_state[n])


def test_centered_matches_sklearn_pca():
    """center=True is Li et al.'s convention: sklearn's PCA of the displacements."""
    from sklearn.decomposition import PCA

    model = make_mlp()
    states = _trajectory(model, m=7, seed=3)
    names = ParameterSpace.from_module(model).names
    pca = pca_directions(states, k=2, ignore=None, center=True, model=model)
    x = np.stack([_flat(s, names) - _flat(states[-1], names) for s in states])
    ref = PCA(n_components=2, svd_solver="full").fit(x)
    for j in range(2):
        got = _flat(pca.directions[j], names)
        np.testing.assert_allclose(np.abs(got @ ref.components_[j]), 1.0, atol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance, ref.explained_variance_, rtol=1e-5)


def test_biasbn_components_are_zero_and_directions_orthonormal():
    model = make_cnn(batchnorm=True)
    pca = pca_directions(_trajectory(model, m=5), k=2, model=model)
    space = ParameterSpace.from_module(model)
    for d in pca.directions:
        for s in space.specs:
            if s.kind != "weight":
                assert torch.count_nonzero(d[s.name]) == 0, s.name
    a, b = (_flat(d, space.names) for d in pca.directions)
    np.testing.assert_allclose([a @ a, b @ b, a @ b], [1.0, 1.0, 0.0], atol=1e-6)


def test_normalization_is_applied_after_pca():
    model = make_mlp()
    states = _trajectory(model, m=5)
    plain = pca_directions(states, k=2, model=model)
    filt = pca_directions(states, k=2, model=model, normalization="filter")
    for p, f in zip(plain.directions, filt.directions, strict=True):
        want = normalize_direction(p, plain.origin, normalization="filter", ignore="biasbn")
        for n in want:
            torch.testing.assert_close(f[n], want[n])
    np.testing.assert_array_equal(plain.explained_variance_ratio, filt.explained_variance_ratio)


def test_state_dicts_with_buffers_and_models_unchanged():
    models = [make_cnn(seed=s, batchnorm=True) for s in range(4)]
    befores = [snapshot(m) for m in models]
    from_models = pca_directions(models, k=2)
    from_states = pca_directions([m.state_dict() for m in models], k=2, model=models[0])
    for m, b in zip(models, befores, strict=True):
        assert_unchanged(m, b)
    assert set(from_states.directions[0]) == set(ParameterSpace.from_module(models[0]).names)
    for a, b in zip(from_models.directions, from_states.directions, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n])


def test_sign_makes_training_run_toward_plus():
    model = make_mlp()
    states = _trajectory(model, m=8, seed=5)
    pca = pca_directions(states, k=2, model=model)
    coords = project_trajectory(states, pca.origin, pca).coords
    order = np.arange(len(states)) - (len(states) - 1) / 2
    assert (order @ coords > 0).all()


def test_plane_trajectory_projects_with_zero_distance_and_reconstructs():
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (5, 4), "a.bias": (5,), "b.weight": (3, 5)}
    origin = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    d1 = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    d2 = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    ab = np.array([[-2.0, 1.0], [-1.5, 0.2], [-0.7, -0.4], [-0.2, 0.3], [0.0, 0.0]])
    states = [{n: origin[n] + a * d1[n] + b * d2[n] for n in shapes} for a, b in ab]

    pca = pca_directions(states, k=2, ignore=None)
    proj = project_trajectory(states, pca.origin, pca)
    assert proj.distance.max() < Tol.EXACT * max(proj.norm.max(), 1.0)
    np.testing.assert_allclose(proj.explained, 1.0, atol=Tol.EXACT)
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), 1.0, atol=Tol.EXACT)
    for st, c in zip(states, proj.coords, strict=True):
        for n in shapes:
            rebuilt = pca.origin[n] + c[0] * pca.directions[0][n] + c[1] * pca.directions[1][n]
            torch.testing.assert_close(rebuilt, st[n], atol=Tol.EXACT, rtol=0)
    # the same plane from the generating (non-orthogonal) directions: the generating coordinates
    np.testing.assert_allclose(project_trajectory(states, origin, [d1, d2]).coords, ab, atol=Tol.EXACT)


def test_projection_equals_numpy_lstsq():
    model = make_mlp()
    states = _trajectory(model, m=5, seed=2)
    names = ParameterSpace.from_module(model).names
    g = torch.Generator().manual_seed(0)
    dirs = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(2)]
    before = snapshot(model)
    proj = project_trajectory(states, model, dirs)
    assert_unchanged(model, before)
    a = np.stack([_flat(d, names) for d in dirs], axis=1)
    deltas = np.stack([_flat(s, names) for s in states]) - _flat(dict(model.named_parameters()), names)
    want, *_ = np.linalg.lstsq(a, deltas.T, rcond=None)
    np.testing.assert_allclose(proj.coords, want.T, rtol=1e-8, atol=1e-10)
    resid = np.linalg.norm(deltas - (a @ want).T, axis=1)
    np.testing.assert_allclose(proj.distance, resid, rtol=1e-8)
    np.testing.assert_allclose(proj.norm, np.linalg.norm(deltas, axis=1), rtol=1e-12)
    np.testing.assert_allclose(proj.explained, 1 - resid**2 / np.linalg.norm(deltas, axis=1) ** 2, rtol=1e-8)


def test_uncentered_ratios_are_the_share_the_plane_explains():
    """Uncentered: Σ ratios = Σᵢ‖projᵢ‖² / Σᵢ‖δᵢ‖², the projection's own measure."""
    model = make_mlp()
    states = _trajectory(model, m=6, seed=4)
    pca = pca_directions(states, k=2, ignore=None, model=model)
    proj = project_trajectory(states, pca.origin, pca)
    share = (proj.norm**2 - proj.distance**2).sum() / (proj.norm**2).sum()
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), share, rtol=1e-8)


def test_biasbn_projection_measures_weights_only():
    model = make_mlp()
    states = _trajectory(model, m=4)
    pca = pca_directions(states, k=2, model=model)
    every = project_trajectory(states, pca.origin, pca)
    weights = project_trajectory(states, pca.origin, pca, ignore="biasbn")
    np.testing.assert_allclose(every.coords, weights.coords, rtol=1e-8, atol=1e-12)
    assert (weights.distance[:-1] < every.distance[:-1]).all()


BAD = [
    pytest.param(dict(checkpoints="one"), ConfigurationError, "at least two", id="one-checkpoint"),
    pytest.param(dict(k=0), ConfigurationError, "k=0", id="k-zero"),
    pytest.param(dict(k=5), ConfigurationError, "need at least 5 checkpoints", id="k-too-large"),
    pytest.param(dict(reference=9), ConfigurationError, "out of range", id="reference-range"),
    pytest.param(dict(reference="first"), ConfigurationError, "reference='first'", id="reference-word"),
    pytest.param(dict(ignore="bias"), ConfigurationError, "ignore='bias'", id="ignore"),
    pytest.param(dict(method="eig"), ConfigurationError, "method='eig'", id="method"),
    pytest.param(dict(rank1=True), ConfigurationError, "span only 1 dimension", id="rank-deficient"),
    pytest.param(dict(same=True), ConfigurationError, "equals the reference", id="no-displacement"),
    pytest.param(dict(shape=True), ShapeMismatchError, "checkpoints\\[1\\]", id="other-architecture"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input(change, error, match):
    model = make_mlp()
    states = _trajectory(model, m=4)
    kwargs = dict(k=2, model=model)
    if change.pop("rank1", False):
        base = {n: t.double() for n, t in states[0].items()}  # exactly on a line
        states = [{n: base[n] * (1 + 0.125 * i) for n in base} for i in range(4)]
    if change.pop("same", False):
        states = [states[0]] * 3
    if change.pop("shape", False):
        states = [states[0], {n: p.detach() for n, p in make_mlp().named_parameters()} | {"0.weight": torch.zeros(2, 2)}]
        kwargs["k"] = 1
    checkpoints = states[:1] if change.pop("checkpoints", None) else states
    with pytest.raises(error, match=match):
        pca_directions(checkpoints, **{**kwargs, **change})


def test_projection_bad_input():
    model = make_mlp()
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ConfigurationError, match="linearly dependent"):
        project_trajectory([model], model, [d, {n: 2 * t for n, t in d.items()}])
    with pytest.raises(ConfigurationError, match="wrap a single direction"):
        project_trajectory([model], model, d)
    with pytest.raises(ShapeMismatchError, match="origin"):
        project_trajectory([model], {"0.weight": torch.zeros(16, 6)}, [d])


def test_column_chunks_give_the_same_result(monkeypatch):
    """Large tensors go in column chunks; tiny chunks (a few entries) change nothing."""
    import landscapes.trajectory as trajectory

    model = make_cnn(batchnorm=True)
    states = _trajectory(model, m=5, seed=9)
    whole = pca_directions(states, k=2, model=model, method="gram")
    proj_whole = project_trajectory(states, whole.origin, whole)
    monkeypatch.setattr(trajectory, "CHUNK_BYTES", 8 * 7 * 3)
    chunked = pca_directions(states, k=2, model=model, method="gram")
    proj_chunked = project_trajectory(states, chunked.origin, chunked)
    for a, b in zip(whole.directions, chunked.directions, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole.singular_values, chunked.singular_values, rtol=1e-12)
    np.testing.assert_allclose(proj_whole.coords, proj_chunked.coords, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(proj_whole.distance, proj_chunked.distance, rtol=1e-10)
