"""BatchNorm statistics re-estimated at a point of the landscape.

At a perturbed point, θ0's running statistics no longer describe the activations, and a
network with BatchNorm evaluated with them can look much worse (or better) than it is.
:func:`recalibrate_bn` re-estimates them the way ``torch.optim.swa_utils.update_bn`` does:
reset, cumulative average (``momentum=None``) over fixed batches in train mode, no gradients;
everything else (dropout) stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["BN_MODULES", "recalibrate_bn", "batchnorm_modules"]

#: Modules whose running statistics the modes of evaluation choose between.
BN_MODULES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BN_MODULES) and m.track_running_stats and m.running_mean is not None]


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
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    forward = forward or model
    modules = list(model.modules())
    modes = [m.training for m in modules]
    momenta = [m.momentum for m in bns]
    n = 0
    try:
        model.train(False)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train(True)
        with torch.no_grad():
            for batch in inputs:
                forward(batch)
                n += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode
    return n
