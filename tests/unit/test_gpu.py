"""GPU: the same directions and the same landscape on CUDA as on the CPU (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from tests.conftest import make_cnn, make_mlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _full_fp32():
    """TF32 convolutions/matmuls would round to 10 bits: compare in full float32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_directions_are_the_same_on_cuda() -> None:
    model = make_mlp()
    cpu = L.random_direction(model, seed=4)
    gpu = L.random_direction(model.cuda(), seed=4)
    for name in cpu:
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factory,shape", [(make_mlp, (40, 6)), (lambda: make_cnn(batchnorm=True), (40, 16))])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_cuda_landscape_equals_cpu(factory, shape, strategy) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
    model = factory()
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    axes = [L.axis(-1, 1, 5), L.axis(-1, 1, 4)]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    cpu = L.evaluate(model, metric, dirs, axes, strategy="loop")
    gpu = L.evaluate(model, metric, dirs, axes, device="cuda", strategy=strategy)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved
    np.testing.assert_allclose(gpu["loss"], cpu["loss"], rtol=1e-4)
