"""``compile=``: the loop's forwards through torch.compile, checked against the eager forward."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes import compiled
from landscapes.evaluate import Evaluator
from tests.conftest import assert_unchanged, snapshot


class Block(nn.Module):
    """LayerNorm, GELU and a residual: the elementwise work inductor fuses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 32)
        self.norm = nn.LayerNorm(32)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inp(features)
        h = h + nn.functional.gelu(self.mid(self.norm(h)))
        return {"logits": self.out(h)}


def _setup():
    model = Block().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"features": torch.randn(40, 6, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)}
               for _ in range(3)]
    metric = L.Loss(nn.CrossEntropyLoss(), batches)
    dirs = [L.random_direction(model, seed=s) for s in (0, 1)]
    return model, metric, dirs


AXES = [np.linspace(-1, 1, 5)] * 2


def test_compiled_loop_equals_the_eager_loop_and_says_so():
    model, metric, dirs = _setup()
    before = snapshot(model)
    eager = L.evaluate(model, metric, dirs, AXES, strategy="loop", compile="off")
    comp = L.evaluate(model, metric, dirs, AXES, strategy="loop", compile="on")
    assert_unchanged(model, before)
    np.testing.assert_allclose(comp.values["loss"], eager.values["loss"], rtol=1e-5)
    assert eager.metadata["compile"] == "off: not asked (compile='off')"
    assert comp.metadata["compile"].startswith("on: inductor, compiled in")
    # the points really differ: one compiled graph read each point's parameters
    assert np.ptp(comp.values["loss"]) > 0.1


def test_auto_compiles_only_when_the_eager_forwards_take_long(monkeypatch):
    model, metric, dirs = _setup()
    small = L.evaluate(model, metric, dirs, AXES, strategy="loop")  # auto: 25 points of a tiny model
    assert small.metadata["compile"].startswith("off: the eager forwards are estimated at 0 s, under the 60 s")
    monkeypatch.setattr(compiled, "COMPILE_AFTER_SECONDS", 0.0)
    big = L.evaluate(model, metric, dirs, AXES, strategy="loop")
    assert big.metadata["compile"].startswith("on: inductor")
    np.testing.assert_allclose(big.values["loss"], small.values["loss"], rtol=1e-5)


def test_compile_is_not_for_batched_strategies_and_on_warns():
    model, metric, dirs = _setup()
    ls = L.evaluate(model, metric, dirs, AXES, strategy="vmap", compile="auto")
    assert ls.metadata["compile"] == "off: not for this evaluation: the vmap strategy runs its own batched forwards"
    with pytest.warns(L.FallbackWarning, match="compile='on' but not for this evaluation: the vmap strategy"):
        L.evaluate(model, metric, dirs, AXES, strategy="vmap", compile="on")


def test_a_compiled_forward_that_differs_from_the_eager_one_is_not_used():
    model, _, _ = _setup()
    x = torch.randn(8, 6)
    scaled = lambda batch: {"logits": model(batch)["logits"] * (1 + 1e-3)}  # noqa: E731 - another function
    fn, why = compiled.compile_checked(model, x, scaled, compiled.TOLERANCE["fp32"])
    assert fn is None
    assert "differs from the eager one by 0.001" in why and "the eager forward runs" in why
    fn, why = compiled.compile_checked(model, x, model, compiled.TOLERANCE["fp32"])
    assert fn is not None and "from the eager forward on the first batch" in why


def test_a_pickled_evaluator_compiles_again_and_gives_the_same_tile():
    model, metric, dirs = _setup()
    ev = Evaluator(model, metric, dirs, strategy="loop", compile="on")
    assert ev.plan_compile(25).on
    grid = L.Grid(AXES)
    tile = next(iter(grid.tiles((5, 5))))
    here = ev.evaluate_tile(grid, tile)
    there = pickle.loads(pickle.dumps(ev))
    assert there._compiled_forward is not None
    np.testing.assert_allclose(there.evaluate_tile(grid, tile)["loss"], here["loss"], rtol=1e-6)


def test_bad_compile_value_names_the_choices():
    model, metric, dirs = _setup()
    with pytest.raises(L.ConfigurationError, match="compile='yes' is not an option; choose one of 'off', 'on', 'auto'"):
        L.evaluate(model, metric, dirs, AXES, compile="yes")


def test_output_difference_covers_nested_outputs():
    a = {"loss": torch.tensor(2.0), "logits": (torch.ones(3), torch.zeros(2))}
    b = {"loss": torch.tensor(2.0), "logits": (torch.ones(3) * 1.01, torch.zeros(2))}
    assert compiled.relative_difference(a, b) == pytest.approx(0.01 / 1.01, rel=1e-6)
    assert compiled.relative_difference(a, {"loss": torch.tensor(2.0)}) == float("inf")
