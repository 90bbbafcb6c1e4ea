"""Directions in parameter space: seeded Gaussian draws, normalization, between models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from landscapes._checks import check_choice
from landscapes.errors import ConfigurationError
from landscapes.params import ParameterSpace

__all__ = [
    "Normalization",
    "Ignore",
    "Orthogonalized",
    "random_direction",
    "normalize_direction",
    "direction_between",
    "orthogonalize",
    "cosine",
]

Normalization = Literal["filter", "layer", "model"] | None
Ignore = Literal["biasbn"] | None
NORMALIZATIONS = ("filter", "layer", "model", None)
IGNORES = ("biasbn", None)
_EPS = 1e-12  # norms below this count as zero: nothing to rescale


def _parameters(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}
    if isinstance(model, Mapping):
        return {n: t.detach() for n, t in model.items()}
    raise ConfigurationError(
        f"expected an nn.Module or a mapping of name -> tensor, got {type(model).__name__}."
    )


def random_direction(
    model: nn.Module,
    normalization: Normalization = "filter",
    ignore: Ignore = "biasbn",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Gaussian direction, normalized as in Li et al. (2018).

    The raw draws come from a CPU generator seeded with ``seed``, one standard normal per
    parameter in ``named_parameters`` order, so the same seed gives the same draws on any
    device and whatever ``normalization`` or ``ignore`` is.

    Args:
        model: the model at θ0; its parameters set the shapes and the normalization scales.
        normalization: ``"filter"`` (each slice along dim 0 of a tensor with dim > 1 gets the
            norm of the same slice of θ0; tensors with dim ≤ 1 are one filter), ``"layer"``
            (each tensor gets the norm of θ0's tensor), ``"model"`` (one factor for the whole
            direction: its norm equals the norm of θ0 over the same tensors) or ``None``.
        ignore: ``"biasbn"`` zeroes every tensor with dim ≤ 1 (biases, norm-layer
            parameters); ``None`` keeps and normalizes them like the rest.
        seed: seed of the generator.

    Returns:
        Mapping keyed like ``model.named_parameters()``, on the parameters' devices and dtypes.

    >>> d = random_direction(nn.Linear(3, 2), seed=0)
    >>> d["bias"].abs().sum().item(), round(d["weight"][0].norm().item(), 4) > 0
    (0.0, True)
    """
    normalization = check_choice("normalization", normalization, NORMALIZATIONS, where="random_direction")
    ignore = check_choice("ignore", ignore, IGNORES, where="random_direction")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"random_direction: seed={seed!r}: expected an integer.")
    params = _parameters(model)
    space = ParameterSpace.from_module(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.randn(space.numel, generator=generator, dtype=torch.float32)
    raw = {
        s.name: draws[s.offset : s.stop]
        .reshape(s.shape)
        .to(device=params[s.name].device, dtype=params[s.name].dtype)
        for s in space.specs
    }
    return normalize_direction(raw, model, normalization=normalization, ignore=ignore)


def normalize_direction(
    direction: Mapping[str, torch.Tensor],
    reference: nn.Module | Mapping[str, torch.Tensor],
    *,
    normalization: Normalization = "filter",
    ignore: Ignore = "biasbn",
) -> dict[str, torch.Tensor]:
    """Rescale ``direction`` to the scale of ``reference`` (θ0); returns new tensors.

    Slices whose own norm is zero stay zero (no NaN); see :func:`random_direction` for the
    meaning of ``normalization`` and ``ignore``.
    """
    normalization = check_choice("normalization", normalization, NORMALIZATIONS, where="normalize_direction")
    ignore = check_choice("ignore", ignore, IGNORES, where="normalize_direction")
    ref = _parameters(reference)
    out: dict[str, torch.Tensor] = {}
    for name, d in direction.items():
        if name not in ref:
            raise ConfigurationError(
                f"normalize_direction: direction key {name!r} is not a parameter of the reference "
                "model; build the direction from the same architecture."
            )
        d = d.detach().clone()
        if ignore == "biasbn" and d.dim() <= 1:
            d.zero_()
        elif normalization == "filter" and d.dim() > 1:
            d = _rescale(d, ref[name], dims=tuple(range(1, d.dim())))
        elif normalization in ("filter", "layer"):
            d = _rescale(d, ref[name], dims=None)
        out[name] = d
    if normalization == "model":
        kept = [n for n in out if not (ignore == "biasbn" and out[n].dim() <= 1)]
        d_norm = _norm([out[n] for n in kept])
        r_norm = _norm([ref[n] for n in kept])
        factor = r_norm / d_norm if d_norm > _EPS else 0.0
        out = {n: t * factor if n in kept else t for n, t in out.items()}
    return out


def _rescale(d: torch.Tensor, ref: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    d64, r64 = d.double(), ref.detach().double().to(d.device)
    if dims is None:
        d_norm, r_norm = d64.norm(), r64.norm()
    else:
        d_norm = torch.linalg.vector_norm(d64, dim=dims, keepdim=True)
        r_norm = torch.linalg.vector_norm(r64, dim=dims, keepdim=True)
    factor = torch.where(d_norm > _EPS, r_norm / d_norm.clamp_min(_EPS), torch.zeros_like(d_norm))
    return (d64 * factor).to(d.dtype)


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(sum(t.detach().double().pow(2).sum().item() for t in tensors) ** 0.5)


def direction_between(
    start: nn.Module | Mapping[str, torch.Tensor],
    end: nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """θ1 − θ0, keyed like ``start``'s parameters.

    Raises:
        ShapeMismatchError: the two models do not have the same parameter names and shapes.
    """
    a, b = _parameters(start), _parameters(end)
    if isinstance(start, nn.Module):
        ParameterSpace.from_module(start).check(b, what="direction_between: end model's parameters")
    elif set(a) != set(b) or any(a[n].shape != b[n].shape for n in a):
        raise ConfigurationError(
            "direction_between: start and end have different parameter names or shapes; give "
            "two models of the same architecture."
        )
    return {n: (b[n].to(a[n].device, a[n].dtype) - a[n]) for n in a}


@dataclass(frozen=True)
class Orthogonalized:
    """A direction made orthogonal to another, with the cosines before and after."""

    direction: dict[str, torch.Tensor]
    cosine_before: float
    cosine_after: float


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of two directions over all their entries (float64)."""
    fa = torch.cat([a[n].detach().double().reshape(-1).cpu() for n in a])
    fb = torch.cat([b[n].detach().double().reshape(-1).cpu() for n in a])
    denom = fa.norm() * fb.norm()
    return float((fa @ fb) / denom) if denom > 0 else 0.0


def orthogonalize(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    *,
    keep_norm: bool = True,
) -> Orthogonalized:
    """Remove from ``second`` its component along ``first`` (Gram–Schmidt, float64).

    Apply it after normalization. With ``keep_norm`` the result is rescaled to the norm of
    ``second``, so its scale stays that of the normalized direction.
    """
    if set(first) != set(second):
        raise ConfigurationError(
            "orthogonalize: the two directions have different keys; build both from one model."
        )
    names = list(first)
    fa = torch.cat([first[n].detach().double().reshape(-1).cpu() for n in names])
    fb = torch.cat([second[n].detach().double().reshape(-1).cpu() for n in names])
    before = cosine(first, second)
    denom = fa @ fa
    if denom <= 0:
        raise ConfigurationError("orthogonalize: the first direction is all zeros.")
    ortho = fb - (fa @ fb) / denom * fa
    if keep_norm and ortho.norm() > 0:
        ortho = ortho * (fb.norm() / ortho.norm())
    out, offset = {}, 0
    for n in names:
        t = second[n]
        out[n] = ortho[offset : offset + t.numel()].reshape(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return Orthogonalized(out, before, cosine(first, out))
