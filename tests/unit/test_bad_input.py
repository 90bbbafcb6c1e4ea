"""Every error message of the library: it names the problem and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from tests.conftest import make_mlp

MODEL = make_mlp()
X, Y = torch.randn(8, 6), torch.randint(0, 3, (8,))
LOSS = L.Loss(nn.CrossEntropyLoss(), X, Y)
D = L.random_direction(MODEL, seed=0)



class _Returns(L.Metric):
    """A custom metric returning a fixed value, as a buggy user metric would."""

    def __init__(self, value, name):
        self.value, self.name = value, name

    def __call__(self, model_wrapper):
        return self.value


class _Keys(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, a):
        return {"hidden": self.fc(a)}


KEYS = _Keys()
DICT_LOSS = L.Loss(nn.CrossEntropyLoss(), {"a": X, "zzz": X}, Y)
KEYS_D = L.random_direction(KEYS, seed=0)

CASES = [
    pytest.param(lambda: L.evaluate(MODEL, _Returns(None, "nothing"), [D], [[0.0]]), L.MetricValueError,
                 r"metric 'nothing' \(_Returns\) returned None \(a NoneType\) at point 0; a Metric must return one number", id="metric-none"),
    pytest.param(lambda: L.evaluate(MODEL, _Returns("0.5", "text"), [D], [[0.0]]), L.MetricValueError,
                 r"metric 'text' \(_Returns\) returned '0.5' \(a str\)", id="metric-str"),
    pytest.param(lambda: L.evaluate(KEYS, DICT_LOSS, [KEYS_D], [[0.0]]), L.AdapterError,
                 r"does not take the batch as model\(\*\*batch\) with keys \['a', 'zzz'\] \(got an unexpected keyword argument 'zzz'\)\. Set the forward adapter: forward='call'",
                 id="forward-keys"),
    pytest.param(lambda: L.evaluate(KEYS, L.Loss(nn.CrossEntropyLoss(), {"a": X}, Y), [KEYS_D], [[0.0]]), L.AdapterError,
                 r"output='auto': the model returned a dict with keys \['hidden'\]; expected a tensor, a 'logits' field .* Set the output adapter: output='logits'",
                 id="output-no-logits"),
    pytest.param(lambda: L.evaluate(KEYS, L.ModelLoss({"a": X}), [KEYS_D], [[0.0]]), L.AdapterError,
                 r"output='loss': the model returned a dict with keys \['hidden'\]; expected a tensor at 'loss'", id="output-no-loss"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], forward="dict"), L.ConfigurationError,
                 r"forward='dict' is not an option; choose one of 'auto', 'call', 'star', 'kwargs' or give a callable", id="forward-option"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], output="probs"), L.ConfigurationError,
                 r"output='probs' is not an option; choose one of 'auto', 'logits', 'loss', an element index", id="output-option"),
    pytest.param(lambda: L.Loss(nn.CrossEntropyLoss(), {"input_ids": X}), L.ConfigurationError,
                 r"the batch has keys \['input_ids'\] but no 'labels'; add the targets under 'labels'", id="mapping-no-labels"),
    pytest.param(lambda: L.evaluate(MODEL, _Returns(1.0, "one"), [D], [[0.0]], model_mode="recompute_bn"), L.ConfigurationError,
                 r"recompute_bn' re-estimates BatchNorm statistics from the data of a dataset metric", id="recompute-no-data"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], model_mode="recompute_bn", bn_batches=0), L.ConfigurationError,
                 r"bn_batches=0: expected a positive integer", id="bn-batches"),
    pytest.param(lambda: L.point(MODEL, L.Perplexity(X, torch.randn(8, 3))), L.ShapeMismatchError,
                 r"metric 'perplexity': outputs of shape \(8, 3\) do not hold class scores", id="perplexity-shape"),

    pytest.param(lambda: L.random_direction(MODEL, normalization="filters"), L.ConfigurationError,
                 r"normalization='filters' is not an option; choose one of 'filter', 'layer', 'model', None", id="normalization"),
    pytest.param(lambda: L.random_direction(MODEL, ignore="bias"), L.ConfigurationError, r"ignore='bias' is not an option", id="ignore"),
    pytest.param(lambda: L.random_direction(MODEL, seed=1.5), L.ConfigurationError, r"seed=1.5: expected an integer", id="seed"),
    pytest.param(lambda: L.axis(-1, 1, 0), L.ConfigurationError, r"num=0: an axis needs at least one point", id="axis-empty"),
    pytest.param(lambda: L.axis(1.0, 1.0, 9), L.ConfigurationError, r"has zero length but num=9; give start != stop", id="axis-zero-length"),
    pytest.param(lambda: L.axis(-1, float("inf"), 3), L.ConfigurationError, r"not finite; give finite", id="axis-inf"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[]]), L.ConfigurationError, r"axes\[0\] has shape \(0,\)", id="grid-empty"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0, np.nan]]), L.ConfigurationError, r"non-finite coordinates", id="grid-nan"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D, D], [[0.0]]), L.ShapeMismatchError, r"2 direction\(s\) but 1 axis", id="k-mismatch"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, D, [[0.0]]), L.ConfigurationError, r"wrap it in a list: directions=\[d\]", id="single-dict"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [{"0.weight": D["0.weight"]}], [[0.0]]), L.ShapeMismatchError,
                 r"directions\[0\] do not match the model's parameters: missing \[0.bias", id="direction-keys"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [{**D, "0.weight": torch.zeros(2, 2)}], [[0.0]]), L.ShapeMismatchError,
                 r"shape mismatch \[0.weight: \(2, 2\) vs model \(16, 6\)\]", id="direction-shape"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [torch.zeros(5)], [[0.0]]), L.ShapeMismatchError, r"give a flat vector of that length", id="flat-length"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [{n: t * np.nan for n, t in D.items()}], [[0.0]]), L.ConfigurationError,
                 r"directions contain NaN", id="direction-nan"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], strategy="fast"), L.ConfigurationError, r"strategy='fast' is not an option", id="strategy"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], model_mode="test"), L.ConfigurationError, r"model_mode='test'", id="model-mode"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], max_batch_points=0), L.ConfigurationError, r"max_batch_points=0: expected a positive integer", id="tile"),
    pytest.param(lambda: L.evaluate(MODEL, LOSS, [D], [[0.0]], device="cuda:0"), L.ConfigurationError, r"no CUDA device is available; use device='cpu'", id="no-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
    pytest.param(lambda: L.Loss(nn.CrossEntropyLoss(), X), L.ConfigurationError, r"a metric needs targets", id="no-target"),
    pytest.param(lambda: L.evaluate(MODEL, "loss", [D], [[0.0]]), L.ConfigurationError, r"metric must be a landscapes Metric", id="metric-type"),
    pytest.param(lambda: L.evaluate(MODEL, L.Loss(nn.CrossEntropyLoss(), []), [D], [[0.0]]), L.ConfigurationError, r"yielded no batches", id="empty-data"),
    pytest.param(lambda: L.evaluate(MODEL, L.Loss(nn.CrossEntropyLoss(), [X]), [D], [[0.0]]), L.ConfigurationError,
                 r"batch 0 of the data is a Tensor, expected an \(inputs, target\) pair", id="bad-batch"),
    pytest.param(lambda: L.wrap_model(object()), L.ConfigurationError, r"wrap other models with GeneralModelWrapper", id="wrap"),
    pytest.param(lambda: L.random_line(MODEL, LOSS, steps=0), L.ConfigurationError, r"steps=0: expected a positive integer", id="steps"),
    pytest.param(lambda: L.direction_between(MODEL, nn.Linear(6, 16)), L.ShapeMismatchError, r"end model's parameters do not match", id="between"),
]


@pytest.mark.parametrize("call,error,match", CASES)
def test_bad_input_message(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_errors_subclass_builtins() -> None:
    assert issubclass(L.ConfigurationError, ValueError)
    assert issubclass(L.ShapeMismatchError, ValueError)
    assert issubclass(L.CheckpointNotFoundError, FileNotFoundError)
