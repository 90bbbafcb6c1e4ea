"""Hand-batched forward passes of plain ``nn.Sequential`` MLPs and CNNs over a tile of grid points.

For a tile of m points θ(c) = origin + Σ cᵢ·basisᵢ, every ``Linear`` layer becomes one
``baddbmm`` over the m stacked weight matrices, and every ``Conv2d`` one grouped convolution
with the m points stacked along the channels (activations ``(N, m·C, H, W)``, channels-last).
The first layer gets a shortcut: its input is the same for every point and it is linear in its
weights, so its output at every point is ``x·Woᵀ + Σ cᵢ·(x·Bᵢᵀ)`` (for a convolution
``conv(x, Wo) + Σ cᵢ·conv(x, Bᵢ)``), plus the bias terms: k + 1 products per batch for the
whole tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SequentialPlan", "sequential_plan"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
)

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
#: Layers with parameters of their own: those before the first one see the same input everywhere.
_PARAMETERIZED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_CL = torch.channels_last


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

        Activations are ``(N, ...)`` while every point sees the same ones, then ``(m, N, F)``
        after a Linear layer and ``(N, m·C, H, W)`` (channels-last) after a Conv2d layer.

        Args:
            x: one batch of inputs ``(N, ...)``, shared by every point.
            coords: the tile's coordinates in the subspace, ``(m, k)``.
            params: each parameter stacked over the tile, ``(m, *shape)``.
            first: for the first Linear or Conv2d layer, its stacked origin and basis weights
                ``"weight"`` ``((k+1)·out, ...)`` and biases ``"bias"`` ``(k+1, out)``; None
                to skip the shortcut.
            buffers: the root module's buffers by name (BatchNorm running statistics).
            cache: where to keep the first layer's products ``x·[Wo; B]ᵀ`` between tiles when
                ``x`` is the same batch for every tile (one-batch data); None to recompute.
        """
        m = coords.shape[0]
        h, shared, grouped, folded = x, True, False, False
        for i, layer in enumerate(self.layers):
            mod, pre = layer.module, layer.prefix
            if isinstance(mod, nn.Linear) and folded:
                # Flatten + Linear on the grouped layout: one grouped convolution whose kernel
                # covers the whole image, so the activations are never copied into rows
                w, c = params[pre + "weight"], h.shape[1] // m
                bias = params[pre + "bias"].reshape(-1) if mod.bias is not None else None
                h = F.conv2d(h, w.reshape(-1, c, *h.shape[2:]), bias, groups=m)  # (N, m·out, 1, 1)
                h = h.reshape(h.shape[0], m, -1).transpose(0, 1).contiguous()
                grouped = folded = False
            elif isinstance(mod, nn.Linear):
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
            elif isinstance(mod, nn.Conv2d):
                if shared and first is not None:
                    h = _first_conv(h, coords, first, cache, mod)
                else:
                    if shared:
                        h = h.repeat(1, m, 1, 1)
                    bias = params[pre + "bias"].reshape(-1) if mod.bias is not None else None
                    h = F.conv2d(
                        h.contiguous(memory_format=_CL), params[pre + "weight"].flatten(0, 1), bias,
                        mod.stride, mod.padding, mod.dilation, m * mod.groups,
                    )
                shared, grouped = False, True
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if isinstance(mod, nn.BatchNorm2d):
                    if shared:
                        h, shared, grouped = h.repeat(1, m, 1, 1), False, True
                    shape = (1, -1, 1, 1)  # the channels of the grouped layout: m·C
                else:
                    if shared:
                        h, shared = h.unsqueeze(0).expand(m, *h.shape), False
                    shape = (m, 1, -1)
                scale = torch.rsqrt(buffers[pre + "running_var"] + mod.eps)
                w = params[pre + "weight"] * scale if mod.affine else scale.expand(m, -1)
                shift = (params[pre + "bias"] if mod.affine else 0) - buffers[pre + "running_mean"] * w
                h = torch.addcmul(shift.reshape(shape), h, w.reshape(shape))
            elif isinstance(mod, nn.Flatten):
                if grouped and i + 1 < len(self.layers) and isinstance(self.layers[i + 1].module, nn.Linear):
                    folded = True  # the Linear layer reads the image as it is
                elif grouped:  # (N, m·C, H, W) -> (m, N, C·H·W)
                    h, grouped = h.reshape(h.shape[0], m, -1).transpose(0, 1), False
                else:
                    h = mod(h) if shared else h.flatten(2)
            elif isinstance(mod, nn.ReLU) and not shared:
                h = torch.relu_(h)  # h is this tile's own tensor: no second copy
            else:  # activation, pooling or dropout in eval mode; never in place on x
                h = mod(h.clone() if shared and getattr(mod, "inplace", False) else h)
        if shared:
            h = h.unsqueeze(0).expand(m, *h.shape)
        elif grouped:
            h = h.reshape(h.shape[0], m, -1, *h.shape[2:]).transpose(0, 1)
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
        ``base + Σ cᵢ·movesᵢ`` from the shared products, every later Linear layer is one
        ``addmm`` into a buffer reused from point to point, and every later Conv2d layer one
        channels-last convolution.
        """
        m, k = coords.shape
        steps = coords.tolist()
        layers = list(self.layers)
        # the layers before the first parameterized one see the same input at every point
        while layers and not isinstance(layers[0].module, _PARAMETERIZED):
            mod = layers.pop(0).module
            x = mod(x.clone() if getattr(mod, "inplace", False) else x)
        shortcut = first is not None and bool(layers) and isinstance(layers[0].module, (nn.Linear, nn.Conv2d))
        if shortcut:
            mod = layers[0].module
            base, moves = _first_products(x, k, first, cache, mod if isinstance(mod, nn.Conv2d) else None)
        out: torch.Tensor | None = None
        scratch: dict[int, torch.Tensor] = {}  # layer index -> its output buffer, reused
        # autocast skips ops with out=: under it (precision="bf16") each product makes its output
        autocast = torch.is_autocast_enabled(x.device.type)

        def buffer(i: int, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
            if autocast:
                return None
            buf = scratch.get(i)
            if buf is None or buf.shape != (shape or like.shape):
                buf = scratch[i] = torch.empty_like(like) if shape is None else like.new_empty(shape)
            return buf

        for p in range(m):
            h, image = x, None
            for i, layer in enumerate(layers):
                mod, pre = layer.module, layer.prefix
                if i == 0 and shortcut:
                    h = torch.add(base, moves[0], alpha=steps[p][0], out=buffer(i, base))
                    for j in range(1, k):
                        h.add_(moves[j], alpha=steps[p][j])
                elif isinstance(mod, nn.Linear):
                    w = params[pre + "weight"][p]
                    if image is not None:  # its input's columns in (H, W, C) order: so the weight's
                        w, image = w.reshape(-1, *image).permute(0, 2, 3, 1).reshape(w.shape[0], -1), None
                    buf = buffer(i, h, (*h.shape[:-1], mod.out_features))
                    if mod.bias is not None:
                        h = torch.addmm(params[pre + "bias"][p], h, w.T, out=buf)
                    else:
                        h = torch.mm(h, w.T, out=buf)
                elif isinstance(mod, nn.Conv2d):
                    bias = params[pre + "bias"][p] if mod.bias is not None else None
                    h = F.conv2d(
                        h.contiguous(memory_format=_CL), params[pre + "weight"][p], bias,
                        mod.stride, mod.padding, mod.dilation, mod.groups,
                    )
                elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    shape = (-1, 1, 1) if isinstance(mod, nn.BatchNorm2d) else (-1,)
                    scale = torch.rsqrt(buffers[pre + "running_var"] + mod.eps)
                    mean = buffers[pre + "running_mean"].reshape(shape)
                    h = h - mean if i == 0 else h.sub_(mean)
                    if mod.affine:
                        h.mul_((params[pre + "weight"][p] * scale).reshape(shape)).add_(params[pre + "bias"][p].reshape(shape))
                    else:
                        h.mul_(scale.reshape(shape))
                elif isinstance(mod, nn.ReLU):
                    h = torch.relu_(h)  # h is a buffer of this pass, never the input
                elif _flattens_channels_last(mod, h, layers[i + 1 :]):
                    image = h.shape[1:]  # no copy into (C, H, W) order: the Linear reads (H, W, C)
                    h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
                else:
                    h = mod(h)
            if out is None:
                out = torch.empty((m, *h.shape), dtype=h.dtype, device=h.device)
            out[p].copy_(h)
        assert out is not None
        return out


def _flattens_channels_last(mod: nn.Module, h: torch.Tensor, rest: list[_Layer]) -> bool:
    """A Flatten of a channels-last image straight into a Linear layer."""
    return (
        isinstance(mod, nn.Flatten) and h.dim() == 4 and bool(rest) and isinstance(rest[0].module, nn.Linear)
        and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    )


def _first_products(
    x: torch.Tensor, k: int, first: Mapping[str, torch.Tensor], cache: dict[str, torch.Tensor] | None,
    conv: nn.Conv2d | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base = x·Woᵀ + bo`` ``(N, out)`` and ``moves[i] = x·Bᵢᵀ + bᵢ`` ``(k, N, out)``; for a
    convolution ``base = conv(x, Wo) + bo`` ``(N, C, H, W)`` and ``moves`` ``(k, N, C, H, W)``,
    each point channels-last."""
    if cache is not None and "base" in cache:
        return cache["base"], cache["moves"]
    n = x.shape[0]
    if conv is not None:  # one convolution for θ0 and every direction
        z = F.conv2d(x.contiguous(memory_format=_CL), first["weight"], None, conv.stride, conv.padding, conv.dilation)
        c, hw = z.shape[1] // (k + 1), z.shape[2:]
        z = z.reshape(n, k + 1, c, *hw).transpose(0, 1) + first["bias"].reshape(k + 1, 1, c, 1, 1)
        z = z.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # each point channels-last
    else:
        z = x @ first["weight"].T  # (N, (k+1)·out): one product for θ0 and every direction
        z = z.reshape(n, k + 1, -1).permute(1, 0, 2) + first["bias"].unsqueeze(1)  # (k+1, N, out)
    base, moves = z[0], z[1:]
    if conv is None:
        base, moves = base.contiguous(), moves.contiguous()
    if cache is not None:
        cache.update(base=base, moves=moves)
    return base, moves


def _first_linear(
    x: torch.Tensor, coords: torch.Tensor, first: Mapping[str, torch.Tensor], cache: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    base, moves = _first_products(x, coords.shape[1], first, cache)
    n, out = base.shape
    return torch.addmm(base.reshape(1, -1), coords, moves.reshape(coords.shape[1], -1)).reshape(-1, n, out)


def _first_conv(
    x: torch.Tensor, coords: torch.Tensor, first: Mapping[str, torch.Tensor], cache: dict[str, torch.Tensor] | None,
    mod: nn.Conv2d,
) -> torch.Tensor:
    """The first convolution at every point of ``coords`` ``(m, k)``: ``(N, m·C, H, W)``, channels-last."""
    base, moves = _first_products(x, coords.shape[1], first, cache, mod)
    # written straight into the channels-last layout, (N, H, W, m, C), from the channels-last products
    steps = moves.permute(0, 1, 3, 4, 2).unsqueeze(4)  # (k, N, H, W, 1, C)
    h = torch.addcmul(base.permute(0, 2, 3, 1).unsqueeze(3), coords[:, :1], steps[0])
    for i in range(1, coords.shape[1]):
        h.addcmul_(coords[:, i : i + 1], steps[i])
    n, hh, ww, m, c = h.shape
    return h.reshape(n, hh, ww, m * c).permute(0, 3, 1, 2)


def sequential_plan(root: nn.Module) -> SequentialPlan | None:
    """A plan when ``root`` is (or only wraps) a Sequential of supported layers in eval mode.

    Supported: Linear, Conv2d (zero padding), BatchNorm1d/2d with running statistics, max and
    average pooling, Flatten, Dropout, elementwise activations; convolutions and 2-d layers
    only before the Flatten, Linear and BatchNorm1d only after it. The caller must still
    check the plan against ``root``'s own forward, since a wrapper's ``forward`` may do more
    than call its Sequential.
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
    if not any(isinstance(layer.module, (nn.Linear, nn.Conv2d)) for layer in layers):
        return None
    if not _in_order(layers):
        return None
    return SequentialPlan(tuple(layers))


def _collect(seq: nn.Sequential, prefix: str, out: list[_Layer]) -> bool:
    for name, mod in seq.named_children():
        pre = f"{prefix}{name}."
        if isinstance(mod, nn.Sequential):
            if not _collect(mod, pre, out):
                return False
        elif isinstance(mod, (nn.Linear, *_ELEMENTWISE, nn.Dropout, *_POOLS)):
            out.append(_Layer(mod, pre))
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
            out.append(_Layer(mod, pre))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and mod.track_running_stats and mod.running_mean is not None:
            out.append(_Layer(mod, pre))
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            out.append(_Layer(mod, pre))
        else:
            return False
    return True


def _in_order(layers: list[_Layer]) -> bool:
    """Image layers (Conv2d, BatchNorm2d, pooling) only before a Flatten, and Linear and
    BatchNorm1d only after it when there are image layers: the layouts the passes keep."""
    image, flat = False, False
    for layer in layers:
        mod = layer.module
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, *_POOLS)):
            if flat:
                return False
            image = True
        elif isinstance(mod, nn.Flatten):
            flat = True
        elif isinstance(mod, (nn.Linear, nn.BatchNorm1d)):
            if image and not flat:
                return False
            flat = True
    return True
