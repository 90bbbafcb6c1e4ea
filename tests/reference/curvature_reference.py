"""Dense float64 Hessians to check the curvature estimates against.

The whole dataset in one batch, the model copied to float64, the loss as a function of one
flat parameter vector, and ``torch.autograd.functional.hessian`` on it: nothing shared with
the library's Hessian-vector products, their batching or their weighting.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: Any,
    target: torch.Tensor,
    *,
    call: Callable[[nn.Module, Any], Any] | None = None,
    read: Callable[[Any], torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    train_bn: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """The Hessian ``(n, n)`` (float64) of ``loss_fn(read(call(model, inputs)), target)``
    over the parameters ``names`` (default all, in model order), and those names."""
    ref = copy.deepcopy(model).double().eval()
    if train_bn:
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(True)
    named = dict(ref.named_parameters())
    names = list(names) if names is not None else list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    x, y = _double(inputs), _double(target)
    call = call or (lambda m, b: m(b))
    read = read or (lambda o: o)

    class _Call(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, b: Any) -> Any:
            return call(self.inner, b)

    wrapped = _Call(ref)

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {"inner." + n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        buffers = {"inner." + n: b.clone() for n, b in ref.named_buffers()}  # train-mode BN writes them
        return loss_fn(read(torch.func.functional_call(wrapped, {**params, **buffers}, (x,))), y)

    H = torch.autograd.functional.hessian(f, theta0, vectorize=True)
    return 0.5 * (H + H.T), names


def dense_gradient(model: nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: Any, target: torch.Tensor) -> torch.Tensor:
    """The gradient (float64, flat) of the loss over all the data in one batch."""
    ref = copy.deepcopy(model).double()
    loss = loss_fn(ref(_double(inputs)), _double(target))
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def spectrum(H: torch.Tensor) -> np.ndarray:
    """Eigenvalues, descending."""
    return torch.linalg.eigvalsh(H).flip(0).numpy()
