"""A flat view of a model's parameters, with the spec of every tensor."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from landscapes.errors import ShapeMismatchError

__all__ = ["TensorSpec", "ParameterSpace", "NORM_LAYERS", "Kind"]

Kind = Literal["weight", "bias", "norm"]

#: Module types whose parameters count as normalization-layer parameters (kind ``"norm"``).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    kind: Kind

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class ParameterSpace:
    """Names, shapes, offsets and kinds of a model's parameters, in ``named_parameters`` order.

    The flat vector concatenates every parameter, flattened. Buffers (BatchNorm running
    statistics) are not part of it.

    >>> space = ParameterSpace.from_module(nn.Linear(3, 2))
    >>> [(s.name, s.shape, s.kind) for s in space.specs]
    [('weight', (2, 3), 'weight'), ('bias', (2,), 'bias')]
    """

    specs: tuple[TensorSpec, ...]
    numel: int

    @classmethod
    def from_module(cls, model: nn.Module) -> ParameterSpace:
        """The parameter space of ``model`` (shared parameters appear once)."""
        norm_owned: set[int] = set()
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                norm_owned.update(id(p) for p in module.parameters(recurse=False))
        specs, offset = [], 0
        for name, p in model.named_parameters():
            if id(p) in norm_owned:
                kind: Kind = "norm"
            elif p.dim() <= 1:
                kind = "bias"
            else:
                kind = "weight"
            specs.append(TensorSpec(name, tuple(p.shape), offset, p.numel(), kind))
            offset += p.numel()
        return cls(tuple(specs), offset)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def flatten(self, tensors: Mapping[str, torch.Tensor], *, what: str = "tensors") -> torch.Tensor:
        """Concatenate a name → tensor mapping into one flat vector, checking names and shapes."""
        self.check(tensors, what=what)
        return torch.cat([tensors[s.name].detach().reshape(-1) for s in self.specs])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(..., n)``) shaped like each parameter (leading dims kept)."""
        lead = flat.shape[:-1]
        return {
            s.name: flat[..., s.offset : s.stop].reshape(*lead, *s.shape) for s in self.specs
        }

    def subset(self, names: Iterable[str]) -> ParameterSpace:
        """The space of only ``names`` (in this space's order), with offsets from 0."""
        wanted = set(names)
        specs, offset = [], 0
        for s in self.specs:
            if s.name in wanted:
                specs.append(TensorSpec(s.name, s.shape, offset, s.numel, s.kind))
                offset += s.numel
        return ParameterSpace(tuple(specs), offset)

    def select(self, flat: torch.Tensor, sub: ParameterSpace) -> torch.Tensor:
        """The entries of ``flat`` (``(..., n)``) that belong to ``sub``, laid out as ``sub``."""
        by_name = {s.name: s for s in self.specs}
        parts = [flat[..., by_name[s.name].offset : by_name[s.name].stop] for s in sub.specs]
        return torch.cat(parts, dim=-1) if parts else flat[..., :0].clone()

    def check(self, tensors: Mapping[str, torch.Tensor], *, what: str = "tensors") -> None:
        """Raise ShapeMismatchError unless ``tensors`` has exactly this space's names and shapes."""
        missing = [n for n in self.names if n not in tensors]
        unexpected = [n for n in tensors if n not in set(self.names)]
        wrong = [
            f"{s.name}: {tuple(tensors[s.name].shape)} vs model {s.shape}"
            for s in self.specs
            if s.name in tensors and tuple(tensors[s.name].shape) != s.shape
        ]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {_few(missing)}")
            if unexpected:
                parts.append(f"unexpected {_few(unexpected)}")
            if wrong:
                parts.append(f"shape mismatch {_few(wrong)}")
            raise ShapeMismatchError(
                f"{what} do not match the model's parameters: {'; '.join(parts)}. Build them "
                "from the same architecture (keys as in model.named_parameters())."
            )


def _few(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """θ as one detached flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
