"""How a batch reaches the model, and which part of the model's output the metrics read.

Two small adapters, each named by a string (so a config can set it) or given as a callable:

- :class:`Forward` (``forward=``): ``"auto"`` calls ``model(x)`` for a tensor, ``model(*x)``
  for a tuple or list, ``model(**x)`` for a mapping; ``"call"``, ``"star"`` and ``"kwargs"``
  force one of these; a callable ``forward(model, batch)`` does anything else.
- :class:`Output` (``output=``): ``"auto"`` reads a tensor output as it is, else its
  ``logits`` (attribute or key, as in HuggingFace outputs), else element 0 of a tuple;
  ``"logits"`` and ``"loss"`` read that field, an ``int`` reads that element, a callable
  ``output(out)`` returns the tensor itself.

For a plain tensor in and a tensor out, both cost one ``isinstance`` check.

>>> Output("auto")((torch.ones(2), torch.zeros(1))).shape
torch.Size([2])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from landscapes.errors import AdapterError, ConfigurationError

__all__ = [
    "Forward", "Output", "ForwardSpec", "OutputSpec", "FORWARDS", "OUTPUTS", "first_tensor",
    "map_tensors", "without_key",
]

ForwardSpec = Literal["auto", "call", "star", "kwargs"] | Callable[[nn.Module, Any], Any]
OutputSpec = Literal["auto", "logits", "loss"] | int | Callable[[Any], torch.Tensor]
FORWARDS = ("auto", "call", "star", "kwargs")
OUTPUTS = ("auto", "logits", "loss")


class Forward:
    """Runs ``model`` on one batch: ``model(x)``, ``model(*x)``, ``model(**x)`` or ``how(model, x)``.

    Args:
        how: ``"auto"`` (by the batch's type), ``"call"``, ``"star"``, ``"kwargs"``, or a
            callable ``how(model, batch) -> output``.
    """

    def __init__(self, how: ForwardSpec = "auto"):
        if isinstance(how, Forward):
            how = how.how
        if not callable(how) and how not in FORWARDS:
            shown = ", ".join(repr(c) for c in FORWARDS)
            raise ConfigurationError(
                f"forward={how!r} is not an option; choose one of {shown} or give a callable "
                "forward(model, batch)."
            )
        self.how = how

    def kind(self, batch: Any) -> str | None:
        """``"call"``, ``"star"`` or ``"kwargs"`` for this batch; None for a callable."""
        how = self.how
        if how == "auto":
            if isinstance(batch, torch.Tensor):
                return "call"
            if isinstance(batch, Mapping):
                return "kwargs"
            if isinstance(batch, (tuple, list)):
                return "star"
            return "call"
        return how if isinstance(how, str) else None

    def __call__(self, model: Callable[..., Any], batch: Any) -> Any:
        if isinstance(batch, torch.Tensor) and self.how in ("auto", "call"):
            return model(batch)  # the plain path: nothing else to decide
        kind = self.kind(batch)
        if kind is None:
            return self.how(model, batch)
        args, kwargs = _arguments(kind, batch)
        try:
            return model(*args, **kwargs)
        except TypeError as err:
            problem = _binding_problem(model, args, kwargs)
            if problem is None:
                raise  # the signature fits: the TypeError comes from inside the model
            raise AdapterError(self._explain(kind, batch, problem)) from err

    def takes(self, model: Callable[..., Any], key: str) -> bool:
        """Whether a mapping batch's ``key`` (its targets) should reach ``model``: always for
        ``"call"`` and callables (they get the whole batch), for ``"kwargs"`` and ``"auto"``
        when the model's forward names it or takes ``**kwargs`` (as HuggingFace models take
        ``labels``)."""
        if self.how not in ("auto", "kwargs"):
            return True
        fn = model.forward if isinstance(model, nn.Module) else model
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return True
        return any(p.name == key or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def _explain(self, kind: str, batch: Any, problem: str) -> str:
        if kind == "kwargs":
            how = f"model(**batch) with keys {sorted(map(str, batch))}"
        elif kind == "star":
            how = f"model(*batch) with {len(batch)} positional arguments"
        else:
            how = f"model(batch) with one {type(batch).__name__}"
        return (
            f"forward={self.how!r}: the model does not take the batch as {how} ({problem}). "
            "Set the forward adapter: forward='call' (model(batch)), 'star' (model(*batch)), "
            "'kwargs' (model(**batch)), or a callable forward(model, batch); or give only the "
            "keys the model takes."
        )

    def describe(self) -> str:
        return _name(self.how)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Forward) and self.how == other.how

    def __hash__(self) -> int:
        return hash(("Forward", self.how if isinstance(self.how, str) else id(self.how)))

    def __repr__(self) -> str:
        return f"Forward({self.describe()!r})"


class Output:
    """Reads the tensor the metrics see from a model's output.

    Args:
        what: ``"auto"``, ``"logits"``, ``"loss"``, an element index, or a callable
            ``what(output) -> tensor``.
    """

    def __init__(self, what: OutputSpec = "auto"):
        if isinstance(what, Output):
            what = what.what
        if isinstance(what, str) and what.lstrip("-").isdigit():
            what = int(what)  # "0" from a config, where a field holds one type
        ok = callable(what) or what in OUTPUTS or (isinstance(what, int) and not isinstance(what, bool))
        if not ok:
            shown = ", ".join(repr(c) for c in OUTPUTS)
            raise ConfigurationError(
                f"output={what!r} is not an option; choose one of {shown}, an element index "
                "(e.g. 0) or a callable output(model_output) -> tensor."
            )
        self.what = what

    @property
    def plain(self) -> bool:
        """Whether a tensor output passes unchanged."""
        return self.what == "auto"

    def __call__(self, out: Any) -> torch.Tensor:
        what = self.what
        if isinstance(out, torch.Tensor) and what == "auto":
            return out
        if what == "auto":
            got = _field(out, "logits")
            if got is None and isinstance(out, (tuple, list)) and out:
                got = out[0]
        elif what in ("logits", "loss"):
            got = _field(out, what)
        elif isinstance(what, int):  # an element of a tuple or list, never a row of a tensor
            got = out[what] if isinstance(out, (tuple, list)) and -len(out) <= what < len(out) else None
        else:
            got = what(out)
        if not isinstance(got, torch.Tensor):
            raise AdapterError(self._explain(out, got))
        return got

    def _explain(self, out: Any, got: Any) -> str:
        kind = type(out).__name__
        fields = ""
        if isinstance(out, Mapping):
            fields = f" with keys {sorted(map(str, out))}"
        elif isinstance(out, (tuple, list)):
            fields = f" of length {len(out)}"
        if self.what == "auto":
            wanted = "a tensor, a 'logits' field or a tuple starting with a tensor"
        elif callable(self.what):
            wanted = f"a tensor from {self.describe()}, got {type(got).__name__}"
        else:
            wanted = f"a tensor at {self.what!r}" + (
                " (HuggingFace models return a loss only when the batch has labels)" if self.what == "loss"
                else " of a tuple or list" if isinstance(self.what, int) else ""
            )
        return (
            f"output={self.describe()!r}: the model returned a {kind}{fields}; expected {wanted}. "
            "Set the output adapter: output='logits', 'loss', an element index such as 0, or a "
            "callable output(model_output) -> tensor."
        )

    def describe(self) -> str | int:
        return self.what if isinstance(self.what, int) else _name(self.what)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Output) and self.what == other.what

    def __hash__(self) -> int:
        return hash(("Output", self.what if isinstance(self.what, (str, int)) else id(self.what)))

    def __repr__(self) -> str:
        return f"Output({self.describe()!r})"


def _arguments(kind: str, batch: Any) -> tuple[tuple, dict]:
    if kind == "kwargs":
        if not isinstance(batch, Mapping):
            raise AdapterError(
                f"forward='kwargs' needs a mapping batch, got a {type(batch).__name__}; use "
                "forward='auto' or 'call'."
            )
        return (), dict(batch)
    if kind == "star":
        if not isinstance(batch, (tuple, list)):
            raise AdapterError(
                f"forward='star' needs a tuple or list batch, got a {type(batch).__name__}; use "
                "forward='auto' or 'call'."
            )
        return tuple(batch), {}
    return (batch,), {}


def _binding_problem(model: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """Why ``model(*args, **kwargs)`` does not fit its signature, or None if it does."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        return str(err)
    except ValueError:  # no signature (builtins): cannot tell
        return None
    return None


def _field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def _name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__qualname__", None) or type(spec).__name__


def map_tensors(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """``fn`` applied to every tensor of a nested tuple / list / mapping; other leaves as they are."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        items = [map_tensors(fn, v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, Mapping):
        items = {k: map_tensors(fn, v) for k, v in x.items()}
        try:
            return type(x)(items)
        except TypeError:
            return items
    return x


def without_key(batch: Any, key: str) -> Any:
    """A mapping batch without ``key``; anything else as it is."""
    if isinstance(batch, Mapping) and key in batch:
        return {k: v for k, v in batch.items() if k != key}
    return batch


def first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor of a nested structure (depth first), or None."""
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def tensor_bytes(x: Any) -> int:
    """Bytes of every tensor in a nested structure (a model output)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, Mapping):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(tensor_bytes(v) for v in x)
    return 0
