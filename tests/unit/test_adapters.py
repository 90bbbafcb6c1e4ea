"""Batches and outputs of any shape: the forward and output adapters, on every strategy."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscapes as L
from landscapes.errors import FallbackWarning
from tests.conftest import assert_unchanged, snapshot

RTOL = 1e-5
AXES = [L.axis(-1, 1, 3), L.axis(0, 1, 2)]


@dataclasses.dataclass
class Out:
    """Like a HuggingFace ModelOutput: the logits as an attribute."""

    logits: torch.Tensor
    hidden: torch.Tensor


class TwoInputs(nn.Module):
    """Takes two tensors; returns a tensor, a tuple, a dict or an object with ``logits``."""

    def __init__(self, returns: str = "tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 8)
        self.head, self.aux = nn.Linear(8, 3), nn.Linear(8, 2)
        self.returns = returns

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        h = torch.tanh(self.a(a) + self.b(b))
        logits = self.head(h)
        if self.returns == "tuple":
            return logits, self.aux(h)
        if self.returns == "dict":
            return {"logits": logits, "aux": self.aux(h)}
        if self.returns == "object":
            return Out(logits=logits, hidden=h)
        return logits


class OneMapping(TwoInputs):
    """Takes one mapping as its only argument."""

    def forward(self, batch: dict):  # type: ignore[override]
        return super().forward(batch["a"], batch["b"])


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _dirs(model):
    return [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]


def _reference(model, dirs, axes, loss_of) -> np.ndarray:
    out = np.empty([len(a) for a in axes])
    for idx in np.ndindex(*out.shape):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.add_(sum(float(ax[i]) * d[name] for ax, i, d in zip(axes, idx, dirs, strict=True)))
            out[idx] = loss_of(ref)
    return out


def _each(model, metric, dirs, *, warn_batched=True, **kw):
    """Every strategy's landscape; 'batched' (Sequential MLPs only) falls back with a warning."""
    before = snapshot(model)
    lands = {"loop": L.evaluate(model, metric, dirs, AXES, strategy="loop", **kw)}
    lands["vmap"] = L.evaluate(model, metric, dirs, AXES, strategy="vmap", **kw)
    if warn_batched:
        with pytest.warns(FallbackWarning, match="strategy='batched' needs a plain nn.Sequential"):
            lands["batched"] = L.evaluate(model, metric, dirs, AXES, strategy="batched", **kw)
    lands["auto"] = L.evaluate(model, metric, dirs, AXES, **kw)
    assert_unchanged(model, before)
    return lands


@pytest.mark.parametrize("returns", ["tensor", "tuple", "dict", "object"])
@pytest.mark.parametrize("batch_kind", ["tuple", "dict"])
def test_batches_and_outputs_of_any_shape_on_every_strategy(returns, batch_kind) -> None:
    a, b, y = _data()
    model = TwoInputs(returns).eval()
    x = (a, b) if batch_kind == "tuple" else {"a": a, "b": b}
    metric = [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]
    dirs = _dirs(model)
    lands = _each(model, metric, dirs)

    def loss_of(m):
        out = m(a, b)
        logits = out if returns == "tensor" else out[0] if returns == "tuple" else out["logits"] if returns == "dict" else out.logits
        return F.cross_entropy(logits, y).item()

    want = _reference(model, dirs, AXES, loss_of)
    for strategy, land in lands.items():
        np.testing.assert_allclose(land["loss"], want, rtol=RTOL, err_msg=strategy)
        np.testing.assert_allclose(land["accuracy"], lands["loop"]["accuracy"], atol=1e-12, err_msg=strategy)
    assert lands["auto"].metadata["forward"] == "auto" and lands["auto"].metadata["output"] == "auto"


def test_dataloader_of_tuple_inputs() -> None:
    a, b, y = _data(23)
    model = TwoInputs().eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(a, b, y), batch_size=5, collate_fn=lambda s: (
        (torch.stack([t[0] for t in s]), torch.stack([t[1] for t in s])), torch.stack([t[2] for t in s])))
    dirs = _dirs(model)
    lands = _each(model, L.Loss(nn.CrossEntropyLoss(), loader), dirs, warn_batched=False)
    want = _reference(model, dirs, AXES, lambda m: F.cross_entropy(m(a, b), y).item())
    for land in lands.values():
        np.testing.assert_allclose(land["loss"], want, rtol=RTOL)


@pytest.mark.parametrize(
    "forward",
    ["call", lambda model, batch: model({"a": batch["a"], "b": batch["b"]})],
    ids=["call", "callable"],
)
def test_forward_option_gives_the_mapping_as_one_argument(forward) -> None:
    a, b, y = _data()
    model = OneMapping().eval()
    metric = L.Loss(nn.CrossEntropyLoss(), {"a": a, "b": b}, y)
    dirs = _dirs(model)
    lands = _each(model, metric, dirs, forward=forward)
    want = _reference(model, dirs, AXES, lambda m: F.cross_entropy(m({"a": a, "b": b}), y).item())
    for land in lands.values():
        np.testing.assert_allclose(land["loss"], want, rtol=RTOL)


def test_output_options_and_a_metric_reading_its_own_output() -> None:
    """One forward pass; the loss reads the logits (element 0), a second loss the aux head."""
    a, b, y = _data()
    y2 = torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(4))
    model = TwoInputs("tuple").eval()
    x = (a, b)
    metric = [
        L.Loss(nn.CrossEntropyLoss(), x, y),
        L.Loss(nn.CrossEntropyLoss(), x, y2, output=1, name="aux"),
        L.Loss(nn.CrossEntropyLoss(), x, y2, output=lambda out: out[1], name="aux_fn"),
    ]
    dirs = _dirs(model)
    for strategy in ("loop", "vmap"):
        land = L.evaluate(model, metric, dirs, AXES, strategy=strategy, output=0)
        np.testing.assert_allclose(land["loss"], _reference(model, dirs, AXES, lambda m: F.cross_entropy(m(a, b)[0], y).item()), rtol=RTOL)
        aux = _reference(model, dirs, AXES, lambda m: F.cross_entropy(m(a, b)[1], y2).item())
        np.testing.assert_allclose(land["aux"], aux, rtol=RTOL)
        np.testing.assert_allclose(land["aux_fn"], aux, rtol=RTOL)
        assert land.metadata["output"] == 0


def test_general_model_wrapper_with_mapping_batches() -> None:
    a, b, y = _data()
    model = TwoInputs().eval()
    wrapper = L.GeneralModelWrapper(model, [model], lambda m, batch: m(batch["a"], batch["b"]))
    dirs = _dirs(model)
    land = L.evaluate(wrapper, L.Loss(nn.CrossEntropyLoss(), {"a": a, "b": b}, y), dirs, AXES)
    want = _reference(model, dirs, AXES, lambda m: F.cross_entropy(m(a, b), y).item())
    np.testing.assert_allclose(land["loss"], want, rtol=RTOL)
    with pytest.raises(L.ConfigurationError, match="runs the model through its own forward_fn"):
        L.evaluate(wrapper, L.Loss(nn.CrossEntropyLoss(), {"a": a, "b": b}, y), dirs, AXES, forward="kwargs")


def test_custom_metric_sees_the_same_forward() -> None:
    a, b, y = _data()
    model = TwoInputs().eval()

    class MeanLogit(L.Metric):
        name = "mean_logit"

        def __call__(self, model_wrapper):
            return model_wrapper.forward({"a": a, "b": b}).mean()  # a 0-d tensor

    dirs = _dirs(model)
    land = L.evaluate(model, MeanLogit(), dirs, AXES)
    np.testing.assert_allclose(land["mean_logit"], _reference(model, dirs, AXES, lambda m: m(a, b).mean().item()), rtol=RTOL)


def test_nested_batches_and_structured_targets() -> None:
    a, b, y = _data()
    model = TwoInputs().eval()
    x = {"first": a, "rest": (b,)}
    target = {"class": y, "weight": torch.linspace(0.5, 1.5, len(y))}

    def weighted(out, t):
        return (F.cross_entropy(out, t["class"], reduction="none") * t["weight"]).mean()

    metric = L.Loss(weighted, x, target)
    dirs = _dirs(model)
    for strategy in ("loop", "vmap"):
        land = L.evaluate(model, metric, dirs, AXES, strategy=strategy, forward=lambda m, batch: m(batch["first"], *batch["rest"]))
        np.testing.assert_allclose(land["loss"], _reference(model, dirs, AXES, lambda m: weighted(m(a, b), target).item()), rtol=RTOL)


def test_the_activation_measure_and_the_memory_hold_accept_mappings() -> None:
    a, b, y = _data()
    model = TwoInputs("dict").eval()
    ev = L.Evaluator(model, L.Loss(nn.CrossEntropyLoss(), {"a": a, "b": b}, y), _dirs(model), strategy="vmap")
    assert ev._activation_bytes() > 0 and ev._output_bytes() == (3 + 2) * 4 * len(y)
    with ev.hold_memory():
        first = ev.evaluate_points(np.zeros((2, 2)))
    clone = pickle.loads(pickle.dumps(ev))  # as a worker receives it: string adapters pickle
    np.testing.assert_array_equal(clone.evaluate_points(np.zeros((2, 2)))["loss"], first["loss"])


def test_plain_tensors_keep_the_batched_fast_path(mlp, data) -> None:
    x, y = data
    ev = L.Evaluator(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(mlp))
    assert ev.strategy == "batched"
    ev = L.Evaluator(mlp, L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(mlp), forward="call", output="auto")
    assert ev.strategy == "batched"


def test_adapter_objects_check_their_options() -> None:
    assert L.Forward("star") == L.Forward(L.Forward("star"))
    assert L.Output(0)((torch.ones(1), 2)).shape == (1,)
    assert L.Output("1") == L.Output(1)  # a config's string field
    with pytest.raises(L.ConfigurationError, match=r"output=True is not an option"):
        L.Output(True)
    with pytest.raises(L.AdapterError, match=r"returned a Tensor; expected a tensor at 0 of a tuple or list"):
        L.Output(0)(torch.ones(3, 2))  # never a row of the output


def _same(out):
    return out


def _call(model, batch):
    return model(batch)


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda x, y: (nn.Sequential(nn.Linear(6, 3)), {"output": _same}, L.Loss(nn.CrossEntropyLoss(), x, y)), r"metrics read output='_same'"),
        (lambda x, y: (nn.Sequential(nn.Linear(6, 3)), {"forward": _call}, L.Loss(nn.CrossEntropyLoss(), x, y)), r"forward='_call'"),
        (lambda x, y: (nn.Sequential(nn.Linear(6, 3)), {}, L.Loss(nn.CrossEntropyLoss(), [x], y)), r"the batch is a list"),
    ],
    ids=["output", "forward", "list-batch"],
)
def test_batched_strategy_names_why_it_falls_back(make, why, data) -> None:
    x, y = data
    model, options, metric = make(x, y)
    with pytest.warns(FallbackWarning, match=why):
        ev = L.Evaluator(model, metric, _dirs(model), strategy="batched", **options)
    assert ev.strategy == "vmap"
    want = L.evaluate(model.eval(), L.Loss(nn.CrossEntropyLoss(), x, y), _dirs(model), AXES)
    np.testing.assert_allclose(L.evaluate(model, metric, _dirs(model), AXES, strategy="vmap", **options)["loss"], want["loss"], rtol=RTOL)
