"""Hand-batched forward passes of plain ``nn.Sequential`` MLPs over a tile of grid points.

For a tile of m points θ(c) = origin + Σ cᵢ·basisᵢ, every ``Linear`` layer becomes one
``baddbmm`` over the m stacked weight matrices. The first layer gets a shortcut: its input
is the same for every point and it is linear in its weights, so its output at every point is
``x·Woᵀ + Σ cᵢ·(x·Bᵢᵀ)`` (plus the bias terms): k + 1 products per batch for the whole tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SequentialPlan", "sequential_plan"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
)


@dataclass(frozen=True)
class _Layer:
    module: nn.Module
    prefix: str  # parameter-name prefix inside the root module, e.g. "net.0."


@dataclass(frozen=True)
class SequentialPlan:
    """The layers of a Sequential the batched path can run, with their parameter names."""

    layers: tuple[_Layer, ...]

    def forward(
        self,
        x: torch.Tensor,
        coords: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        first: Mapping[str, torch.Tensor] | None,
        buffers: Mapping[str, torch.Tensor],
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Outputs ``(m, N, ...)`` for the m points of ``coords`` ``(m, k)``.

        Args:
            x: one batch of inputs ``(N, ...)``, shared by every point.
            coords: the tile's coordinates in the subspace, ``(m, k)``.
            params: each parameter stacked over the tile, ``(m, *shape)``.
            first: for the first Linear layer, its stacked origin and basis weights
                ``"weight"`` ``((k+1)·out, in)`` and biases ``"bias"`` ``(k+1, out)``; None to
                skip the shortcut.
            buffers: the root module's buffers by name (BatchNorm running statistics).
            cache: where to keep the first layer's products ``x·[Wo; B]ᵀ`` between tiles when
                ``x`` is the same batch for every tile (one-batch data); None to recompute.
        """
        m = coords.shape[0]
        h, shared = x, True
        for layer in self.layers:
            mod, pre = layer.module, layer.prefix
            if isinstance(mod, nn.Linear):
                if shared and first is not None:
                    h = _first_linear(h, coords, first, cache)
                else:
                    if shared:
                        h = h.unsqueeze(0).expand(m, *h.shape)
                    w = params[pre + "weight"]
                    if mod.bias is not None:
                        h = torch.baddbmm(params[pre + "bias"].unsqueeze(1), h, w.transpose(1, 2))
                    else:
                        h = torch.bmm(h, w.transpose(1, 2))
                shared = False
            elif isinstance(mod, nn.BatchNorm1d):
                if shared:
                    h, shared = h.unsqueeze(0).expand(m, *h.shape), False
                mean, var = buffers[pre + "running_mean"], buffers[pre + "running_var"]
                scale = torch.rsqrt(var + mod.eps)
                if mod.affine:
                    h = (h - mean) * (params[pre + "weight"] * scale).unsqueeze(1) + params[pre + "bias"].unsqueeze(1)
                else:
                    h = (h - mean) * scale
            elif isinstance(mod, nn.Flatten):
                h = mod(h) if shared else h.flatten(2)
            elif isinstance(mod, nn.ReLU) and not shared:
                h = torch.relu_(h)  # h is this tile's own tensor: no second copy
            else:  # elementwise activation or dropout in eval mode; never in place on x
                h = mod(h.clone() if shared and getattr(mod, "inplace", False) else h)
        if shared:
            h = h.unsqueeze(0).expand(m, *h.shape)
        return h

    def forward_each(
        self,
        x: torch.Tensor,
        coords: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        first: Mapping[str, torch.Tensor] | None,
        buffers: Mapping[str, torch.Tensor],
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The same outputs ``(m, N, ...)`` as :meth:`forward`, one point after another.

        For points whose activations do not fit in the caches: each point's first layer is
        ``base + Σ cᵢ·movesᵢ`` from the shared products, and every later Linear layer is one
        ``addmm`` into a buffer reused from point to point.
        """
        m, k = coords.shape
        steps = coords.tolist()
        layers = list(self.layers)
        # the layers before the first parameterized one see the same input at every point
        while layers and not isinstance(layers[0].module, (nn.Linear, nn.BatchNorm1d)):
            mod = layers.pop(0).module
            x = mod(x.clone() if getattr(mod, "inplace", False) else x)
        shortcut = first is not None and bool(layers) and isinstance(layers[0].module, nn.Linear)
        if shortcut:
            base, moves = _first_products(x, k, first, cache)
        out: torch.Tensor | None = None
        scratch: dict[int, torch.Tensor] = {}  # layer index -> its output buffer, reused

        def buffer(i: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
            buf = scratch.get(i)
            if buf is None or buf.shape != shape:
                buf = scratch[i] = torch.empty(shape, dtype=like.dtype, device=like.device)
            return buf

        for p in range(m):
            h = x
            for i, layer in enumerate(layers):
                mod, pre = layer.module, layer.prefix
                if i == 0 and shortcut:
                    h = torch.add(base, moves[0], alpha=steps[p][0], out=buffer(i, base.shape, base))
                    for j in range(1, k):
                        h.add_(moves[j], alpha=steps[p][j])
                elif isinstance(mod, nn.Linear):
                    w = params[pre + "weight"][p]
                    buf = buffer(i, (*h.shape[:-1], mod.out_features), h)
                    if mod.bias is not None:
                        h = torch.addmm(params[pre + "bias"][p], h, w.T, out=buf)
                    else:
                        h = torch.mm(h, w.T, out=buf)
                elif isinstance(mod, nn.BatchNorm1d):
                    scale = torch.rsqrt(buffers[pre + "running_var"] + mod.eps)
                    h = h - buffers[pre + "running_mean"] if i == 0 else h.sub_(buffers[pre + "running_mean"])
                    if mod.affine:
                        h.mul_(params[pre + "weight"][p] * scale).add_(params[pre + "bias"][p])
                    else:
                        h.mul_(scale)
                elif isinstance(mod, nn.ReLU):
                    h = torch.relu_(h)  # h is a buffer of this pass, never the input
                else:
                    h = mod(h)
            if out is None:
                out = torch.empty((m, *h.shape), dtype=h.dtype, device=h.device)
            out[p].copy_(h)
        assert out is not None
        return out


def _first_products(
    x: torch.Tensor, k: int, first: Mapping[str, torch.Tensor], cache: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base = x·Woᵀ + bo`` ``(N, out)`` and ``moves[i] = x·Bᵢᵀ + bᵢ`` ``(k, N, out)``."""
    if cache is not None and "base" in cache:
        return cache["base"], cache["moves"]
    z = x @ first["weight"].T  # (N, (k+1)·out): one product for θ0 and every direction
    n, out = x.shape[0], z.shape[1] // (k + 1)
    z = z.reshape(n, k + 1, out).permute(1, 0, 2) + first["bias"].unsqueeze(1)  # (k+1, N, out)
    base, moves = z[0].contiguous(), z[1:].contiguous()
    if cache is not None:
        cache.update(base=base, moves=moves)
    return base, moves


def _first_linear(
    x: torch.Tensor, coords: torch.Tensor, first: Mapping[str, torch.Tensor], cache: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    base, moves = _first_products(x, coords.shape[1], first, cache)
    n, out = base.shape
    return torch.addmm(base.reshape(1, -1), coords, moves.reshape(coords.shape[1], -1)).reshape(-1, n, out)


def sequential_plan(root: nn.Module) -> SequentialPlan | None:
    """A plan when ``root`` is (or only wraps) a Sequential of supported layers in eval mode.

    Supported: Linear, BatchNorm1d with running statistics, Flatten, Dropout, elementwise
    activations. The caller must still check the plan against ``root``'s own forward, since a
    wrapper's ``forward`` may do more than call its Sequential.
    """
    seq, prefix = root, ""
    if not isinstance(root, nn.Sequential):
        children = list(root.named_children())
        if len(children) != 1 or not isinstance(children[0][1], nn.Sequential):
            return None
        if any(True for _ in root.parameters(recurse=False)):
            return None
        prefix = children[0][0] + "."
        seq = children[0][1]
    layers: list[_Layer] = []
    if not _collect(seq, prefix, layers):
        return None
    if not any(isinstance(layer.module, nn.Linear) for layer in layers):
        return None
    return SequentialPlan(tuple(layers))


def _collect(seq: nn.Sequential, prefix: str, out: list[_Layer]) -> bool:
    for name, mod in seq.named_children():
        pre = f"{prefix}{name}."
        if isinstance(mod, nn.Sequential):
            if not _collect(mod, pre, out):
                return False
        elif isinstance(mod, (nn.Linear, *_ELEMENTWISE, nn.Dropout)):
            out.append(_Layer(mod, pre))
        elif isinstance(mod, nn.BatchNorm1d) and mod.track_running_stats and mod.running_mean is not None:
            out.append(_Layer(mod, pre))
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            out.append(_Layer(mod, pre))
        else:
            return False
    return True
