"""BatchNorm statistics re-estimated at a point of the landscape.

At a perturbed point, θ0's running statistics no longer describe the activations, and a
network with BatchNorm evaluated with them can look much worse (or better) than it is.
:func:`recalibrate_bn` re-estimates them the way ``torch.optim.swa_utils.update_bn`` does:
reset, cumulative average (``momentum=None``) over fixed batches in train mode, no gradients;
everything else (dropout) stays in eval mode. :func:`point_statistics` gives fresh statistics
for many points at once, for the same passes under ``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["BN_MODULES", "recalibrate_bn", "batchnorm_modules", "estimating_statistics", "point_statistics"]

#: Modules whose running statistics the modes of evaluation choose between.
BN_MODULES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BN_MODULES) and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def estimating_statistics(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    """``model`` in eval mode but its BatchNorm modules (yielded) in train mode with
    ``momentum=None``, so their statistics become the plain average over the batches that
    follow; every module's mode and momentum are restored afterwards."""
    bns = batchnorm_modules(model)
    modules = list(model.modules())
    modes = [m.training for m in modules]
    momenta = [m.momentum for m in bns]
    try:
        model.train(False)
        for m in bns:
            m.momentum = None
            m.train(True)
        yield bns
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def point_statistics(model: nn.Module, points: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fresh statistics of ``model``'s BatchNorm modules for ``points`` points, as
    ``reset_running_stats`` leaves them, keyed like ``model.named_buffers()``.

    Returns:
        ``(shared, per_point)``: ``per_point`` holds each ``running_mean`` and ``running_var``
        stacked over the points ``(points, C)``, for ``vmap`` to map over; ``shared`` holds each
        ``num_batches_tracked``, one count for every point (all see the same batches), left
        unmapped because ``momentum=None`` reads it as a Python number, which ``vmap`` cannot.
        None of them is the model's own tensor.

    >>> shared, per_point = point_statistics(nn.Sequential(nn.BatchNorm1d(3)), 2)
    >>> sorted(shared), per_point["0.running_var"].shape
    (['0.num_batches_tracked'], torch.Size([2, 3]))
    """
    bns = {id(m) for m in batchnorm_modules(model)}
    shared: dict[str, torch.Tensor] = {}
    per_point: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if id(m) not in bns:
            continue
        prefix = f"{name}." if name else ""
        mean, var = m.running_mean, m.running_var
        per_point[prefix + "running_mean"] = torch.zeros((points, *mean.shape), dtype=mean.dtype, device=mean.device)
        per_point[prefix + "running_var"] = torch.ones((points, *var.shape), dtype=var.dtype, device=var.device)
        if m.num_batches_tracked is not None:
            shared[prefix + "num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
    return shared, per_point


def recalibrate_bn(model: nn.Module, inputs: Iterable[Any], forward: Callable[[Any], Any] | None = None) -> int:
    """Re-estimate ``model``'s BatchNorm running statistics from ``inputs``, in place.

    The statistics become the plain average over the batches (``momentum=None``); each
    module's momentum and every module's train/eval mode are restored afterwards, so the
    model is left in the mode it was in, with the new statistics. The caller saves and
    restores the old statistics if it needs them.

    Args:
        model: the module holding the BatchNorm layers.
        inputs: batches of model inputs (not ``(inputs, target)`` pairs), as ``forward`` takes them.
        forward: runs the model on one batch; default ``model(batch)``.

    Returns:
        The number of batches used.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    >>> recalibrate_bn(net, [torch.randn(8, 2)]), net.training
    (1, False)
    """
    if not batchnorm_modules(model):
        return 0
    forward = forward or model
    n = 0
    with estimating_statistics(model) as bns:
        for m in bns:
            m.reset_running_stats()
        with torch.no_grad():
            for batch in inputs:
                forward(batch)
                n += 1
    return n
