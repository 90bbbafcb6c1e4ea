"""Model wrappers in the style of ``loss-landscapes``: parameters of some modules, a forward."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from landscapes.adapters import Forward, ForwardSpec
from landscapes.errors import ConfigurationError

__all__ = ["ModelWrapper", "SimpleModelWrapper", "GeneralModelWrapper", "wrap_model"]


class ModelWrapper(abc.ABC):
    """The modules whose parameters span the landscape, and how to run the model.

    Unlike ``loss-landscapes`` 3.0.6, wrapping never changes ``requires_grad`` or the mode
    of the modules.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        if not self.modules or not all(isinstance(m, nn.Module) for m in self.modules):
            raise ConfigurationError(
                "ModelWrapper: modules must be a non-empty list of torch.nn.Module."
            )

    def get_modules(self) -> list[nn.Module]:
        return self.modules

    @property
    def root(self) -> nn.Module:
        """One module holding every wrapped parameter (a ModuleList when there are several)."""
        return self.modules[0] if len(self.modules) == 1 else nn.ModuleList(self.modules)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.root.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.root.parameters()

    def train(self, mode: bool = True) -> ModelWrapper:
        for module in self.modules:
            module.train(mode)
        return self

    def eval(self) -> ModelWrapper:
        return self.train(False)

    @abc.abstractmethod
    def forward(self, x: Any) -> torch.Tensor:
        """The model's output for input ``x``."""

    def __call__(self, x: Any) -> torch.Tensor:
        return self.forward(x)


class SimpleModelWrapper(ModelWrapper):
    """A single module whose ``__call__`` is the forward pass.

    Args:
        model: the module.
        forward: how a batch reaches it (see :class:`landscapes.adapters.Forward`): by
            default ``model(x)`` for a tensor, ``model(*x)`` for a tuple, ``model(**x)`` for
            a mapping.
    """

    def __init__(self, model: nn.Module, forward: ForwardSpec = "auto"):
        super().__init__([model])
        self.forward_adapter = Forward(forward)

    def forward(self, x: Any) -> Any:
        return self.forward_adapter(self.modules[0], x)

    def __setstate__(self, state: dict) -> None:  # wrappers pickled before adapters existed
        self.__dict__.update(state)
        self.__dict__.setdefault("forward_adapter", Forward())


class GeneralModelWrapper(ModelWrapper):
    """``forward_fn(model, x)`` runs ``model``; only the parameters of ``modules`` move."""

    def __init__(self, model: Any, modules: Sequence[nn.Module], forward_fn: Callable[[Any, Any], torch.Tensor]):
        super().__init__(modules)
        if not callable(forward_fn):
            raise ConfigurationError("GeneralModelWrapper: forward_fn must be callable(model, x).")
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, x: Any) -> torch.Tensor:
        return self.forward_fn(self.model, x)


def wrap_model(model: nn.Module | ModelWrapper, forward: ForwardSpec = "auto") -> ModelWrapper:
    """``model`` itself if it is a wrapper, else a :class:`SimpleModelWrapper` around it.

    A ``forward`` other than ``"auto"`` rewraps a :class:`SimpleModelWrapper`'s module; a
    :class:`GeneralModelWrapper` runs its own ``forward_fn`` and takes no ``forward``.
    """
    adapter = Forward(forward)
    if isinstance(model, SimpleModelWrapper) and adapter.how != "auto":
        return SimpleModelWrapper(model.modules[0], forward=adapter)
    if isinstance(model, ModelWrapper):
        if adapter.how != "auto" and not isinstance(model, SimpleModelWrapper):
            raise ConfigurationError(
                f"forward={adapter.describe()!r} applies to a torch.nn.Module; a "
                f"{type(model).__name__} runs the model through its own forward_fn: do what the "
                "adapter would there, and leave forward='auto'."
            )
        return model
    if isinstance(model, nn.Module):
        return SimpleModelWrapper(model, forward=adapter)
    raise ConfigurationError(
        f"expected a torch.nn.Module or a ModelWrapper, got {type(model).__name__}; wrap other "
        "models with GeneralModelWrapper(model, modules, forward_fn)."
    )
