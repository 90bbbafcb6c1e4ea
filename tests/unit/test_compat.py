"""The loss-landscapes calls: shapes, exact endpoints, no drift, θ0 at the centre, seeds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from tests.conftest import assert_unchanged, make_mlp, snapshot
from tests.reference.landscape_reference import landscape_reference


def test_linear_interpolation_endpoints_are_exact(mlp, data) -> None:
    x, y = data
    end = make_mlp(seed=4)
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    values = L.linear_interpolation(mlp, end, metric, steps=11)
    assert values.shape == (11,)
    # the end models' losses, computed by a plain forward pass
    assert values[0] == nn.CrossEntropyLoss()(mlp(x), y).item()
    assert values[-1] == nn.CrossEntropyLoss()(end(x), y).item()
    assert values[-1] == L.point(end, metric)


def test_no_drift_over_1000_steps(mlp, data) -> None:
    x, y = data
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    values = L.random_line(mlp, metric, distance=1.0, steps=1001, seed=3)
    d = L.random_direction(mlp, seed=3)
    moved = copy.deepcopy(mlp)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.copy_(p + 1.0 * d[name])
    assert values[-1] == pytest.approx(L.point(moved, metric), rel=1e-6)
    assert values[500] == pytest.approx(L.point(mlp, metric), rel=1e-6)


def test_random_plane_uses_seed_and_seed_plus_one(mlp, data) -> None:
    x, y = data
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    before = snapshot(mlp)
    values = L.random_plane(mlp, metric, distance=0.5, steps=5, seed=10)
    assert_unchanged(mlp, before)
    dirs = [L.random_direction(mlp, seed=10), L.random_direction(mlp, seed=11)]
    ax = [np.linspace(-0.5, 0.5, 5)] * 2
    np.testing.assert_allclose(values, landscape_reference(mlp, nn.CrossEntropyLoss(), x, y, dirs, ax), rtol=1e-5)
    assert values[2, 2] == pytest.approx(L.point(mlp, metric), rel=1e-6)


def test_normalize_alias_and_metric_pipeline(mlp, data) -> None:
    x, y = data
    pipe = L.MetricPipeline([L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)])
    a = L.random_line(mlp, pipe, distance=0.2, steps=5, normalize="layer")
    b = L.random_line(mlp, pipe, distance=0.2, steps=5, normalization="layer")
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(L.ConfigurationError, match="disagree"):
        L.random_line(mlp, pipe, normalization="model", normalize="layer")


def test_planar_interpolation_places_the_models_at_the_corners(mlp, data) -> None:
    x, y = data
    m1, m2 = make_mlp(seed=5), make_mlp(seed=6)
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    values = L.planar_interpolation(mlp, m1, m2, metric, steps=4)
    assert values.shape == (4, 4)
    assert values[0, 0] == pytest.approx(L.point(mlp, metric), rel=1e-6)
    assert values[-1, 0] == pytest.approx(L.point(m1, metric), rel=1e-6)
    assert values[0, -1] == pytest.approx(L.point(m2, metric), rel=1e-6)


def test_general_model_wrapper_moves_only_its_modules(data) -> None:
    x, y = data
    torch.manual_seed(0)
    frozen, head = nn.Linear(6, 8), nn.Linear(8, 3)
    wrapper = L.GeneralModelWrapper({"f": frozen, "h": head}, [head], lambda m, inp: m["h"](torch.relu(m["f"](inp))))
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    before = frozen.weight.detach().clone()
    values = L.random_line(wrapper, metric, distance=1.0, steps=3, seed=0)
    d = L.random_direction(head, seed=0)
    moved = copy.deepcopy(head)
    with torch.no_grad():
        moved.weight += d["weight"]
    want = nn.CrossEntropyLoss()(moved(torch.relu(frozen(x))), y).item()
    assert values[-1] == pytest.approx(want, rel=1e-6)
    assert torch.equal(frozen.weight, before)
    assert head.weight.requires_grad  # wrapping never freezes the model
