"""Parameter space: kinds, offsets, flatten/unflatten round trip, clear mismatches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from landscapes import ParameterSpace, ShapeMismatchError
from tests.conftest import make_cnn


def test_kinds_offsets_and_round_trip() -> None:
    model = make_cnn(batchnorm=True)
    space = ParameterSpace.from_module(model)
    kinds = {s.name: s.kind for s in space.specs}
    assert kinds["conv1.weight"] == "weight" and kinds["conv1.bias"] == "bias"
    assert kinds["bn.weight"] == "norm" and kinds["bn.bias"] == "norm"
    assert space.numel == sum(p.numel() for p in model.parameters())
    assert [s.offset for s in space.specs] == [sum(s2.numel for s2 in space.specs[:i]) for i in range(len(space.specs))]
    params = dict(model.named_parameters())
    flat = space.flatten(params)
    back = space.unflatten(flat)
    assert all(torch.equal(back[n], params[n]) for n in params)
    stacked = space.unflatten(torch.stack([flat, 2 * flat]))
    assert torch.equal(stacked["conv2.weight"][1], 2 * params["conv2.weight"])
    assert "bn.running_mean" not in space.names  # buffers are not part of θ


def test_layernorm_parameters_are_norm_kind() -> None:
    space = ParameterSpace.from_module(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert [s.kind for s in space.specs] == ["weight", "bias", "norm", "norm"]


def test_mismatch_lists_missing_unexpected_and_shapes() -> None:
    space = ParameterSpace.from_module(nn.Linear(3, 2))
    with pytest.raises(ShapeMismatchError, match=r"missing \[bias\] \(1\); unexpected \[extra\] \(1\); shape mismatch \[weight: \(3, 3\) vs model \(2, 3\)\]"):
        space.flatten({"weight": torch.zeros(3, 3), "extra": torch.zeros(1)})


def test_subset_selects_columns_in_order_and_rebases_offsets() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    space = ParameterSpace.from_module(model)
    flat = torch.arange(float(space.numel)).repeat(2, 1)  # (2, n): leading dims are kept
    sub = space.subset(["2.bias", "0.bias"])  # asked out of order: the space's order wins
    assert sub.names == ("0.bias", "2.bias") and sub.numel == 6
    picked = space.select(flat, sub)
    assert picked.shape == (2, 6)
    views = sub.unflatten(picked)
    torch.testing.assert_close(views["0.bias"][1], torch.arange(12.0, 16.0))  # 0.weight is 12 long
    torch.testing.assert_close(views["2.bias"][0], torch.arange(float(space.numel - 2), float(space.numel)))
    empty = space.subset([])
    assert empty.numel == 0 and space.select(flat, empty).shape == (2, 0)
