"""A custom metric as a plain function ``f(model, batch) -> float``."""

from __future__ import annotations

from typing import Any

from torch import nn


def margin(model: nn.Module, batch: Any) -> float:
    """Mean over samples of the true class's logit minus the best other logit (> 0: correct)."""
    x, y = batch
    logits = model(x)
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return float((true - other).mean())


__all__ = ["margin"]
