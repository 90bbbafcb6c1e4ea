"""Checks the evaluate stage runs before the first tile: the data fits the model, the memory budget fits a point.

A mismatch then fails in one line that names the config keys and the shapes involved, instead
of a torch error from deep inside the first tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import landscapes as L
from landscapes.errors import AdapterError, ConfigurationError
from landscapes.metrics import DataSource

__all__ = ["check_data_fits", "check_memory_budget", "describe"]

_PROBE_SAMPLES = 4


def check_data_fits(model: nn.Module, data: tuple[Any, Any], forward: L.Forward, output: L.Output, *,
                    target_key: str = "labels") -> None:
    """One forward pass of a few samples of the first batch at θ0 (eval mode, no gradients).

    Raises:
        ConfigurationError: the model cannot take the data; names ``data``, the shapes and the error.
    """
    inputs, target = data
    try:
        x, y = next(iter(DataSource(inputs, target, target_key=target_key, needs_target=False)))
    except StopIteration:
        raise ConfigurationError("data: the data yields no batch; check data.dataset and data.limit.") from None
    x = _head(x, _PROBE_SAMPLES)
    if isinstance(x, Mapping) and target_key in x and not forward.takes(model, target_key):
        x = {k: v for k, v in x.items() if k != target_key}  # as the engine does: targets reach a model that names them
    try:
        with torch.no_grad():
            output(forward(model, x))
    except AdapterError:
        raise
    except Exception as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigurationError(
            f"data: {type(model).__name__} cannot take a batch of the data (inputs {describe(x)}"
            f"{'' if y is None else ', targets ' + describe(_head(y, _PROBE_SAMPLES))}): {type(err).__name__}: {cause}. "
            "Check data.dataset (and its transforms) against the model (model._target_ and its keyword "
            "arguments), and adapters.forward for how a batch reaches the model."
        ) from err


def check_memory_budget(evaluator: L.Evaluator, budget: int | None) -> None:
    """Refuse a ``compute.memory_budget`` below what one grid point needs."""
    need = evaluator.bytes_per_point
    if budget is not None and budget < need:
        raise ConfigurationError(
            f"compute.memory_budget={budget}: one grid point of {type(evaluator.root).__name__} needs about "
            f"{_size(need)} ({evaluator.strategy} strategy); set compute.memory_budget to at least {need} bytes, "
            "or null for the default (1 GiB on a CPU, half the free memory on a GPU)."
        )


def describe(value: Any) -> str:
    """Shapes and dtypes of a (nested) batch, e.g. ``(128, 63) float32`` or ``{input_ids: (8, 16) int64}``."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def _head(value: Any, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() else value
    if isinstance(value, Mapping):
        return {k: _head(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_head(v, n) for v in value)
    return value


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
