"""Obvious float64 implementations to check the library against."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def filter_normalize_reference(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each slice along dim 0 rescaled to the norm of w's slice (numpy, float64)."""
    out = np.empty_like(d, dtype=np.float64)
    for i in range(d.shape[0]):
        dn, wn = np.linalg.norm(d[i]), np.linalg.norm(w[i])
        out[i] = d[i] * (wn / dn) if dn > 0 else 0.0
    return out


def landscape_reference(model: nn.Module, loss_fn, x, y, directions, axes) -> np.ndarray:
    """Deep copy in float64, set every point's parameters from scratch, evaluate one by one."""
    ref = copy.deepcopy(model).double().eval()
    theta0 = {n: p.detach().double().clone() for n, p in ref.named_parameters()}
    dirs = [{n: t.detach().double() for n, t in d.items()} for d in directions]
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    shape = tuple(len(a) for a in axes)
    out = np.empty(shape)
    with torch.no_grad():
        for idx in np.ndindex(*shape):
            coords = [float(axes[k][i]) for k, i in enumerate(idx)]
            for name, p in ref.named_parameters():
                p.copy_(theta0[name] + sum(c * d[name] for c, d in zip(coords, dirs, strict=False)))
            out[idx] = float(loss_fn(ref(x), y))
    return out
