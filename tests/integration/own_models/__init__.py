"""A user's own code as the pipeline meets it: datasets, model classes and metrics that live
outside ``pipelines/`` and ``conf/``, named by ``_target_`` from the config group in ``conf/``
here (reached with ``hydra.searchpath``).

Nothing here imports torchvision or transformers: the configs name them by ``_target_``, and the
tests import them first through ``tests.ecosystem.require``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import landscapes as L

CONF = __path__[0] + "/conf"
SEARCHPATH = f"hydra.searchpath=[file://{CONF}]"


# --- datasets --------------------------------------------------------------------------------


def random_images(n: int = 8, classes: int = 10, size: int = 32, seed: int = 0) -> TensorDataset:
    """``n`` random RGB images ``size``×``size`` with random labels."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def token_samples(
    n: int = 6, length: int = 8, vocab: int = 50, seed: int = 0, labels: str = "tokens", classes: int = 2,
    keys: tuple[str, ...] = ("input_ids", "attention_mask", "labels"),
) -> list[dict[str, torch.Tensor]]:
    """Mapping samples as a tokenizer and collator make them: ``input_ids``, ``attention_mask``
    (the last tokens of some sequences padded) and ``labels``: the tokens with padding set to
    -100 (``labels="tokens"``, causal LM), or one class per sequence (``labels="class"``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, n, 2):
        mask[i, length - 1 - i % 3 :] = 0
    if labels == "tokens":
        target = ids.masked_fill(mask == 0, -100)
    else:
        target = torch.randint(0, classes, (n,), generator=g)
    full = {"input_ids": ids, "attention_mask": mask, "labels": target}
    return [{k: full[k][i] for k in keys} for i in range(n)]


# --- models ----------------------------------------------------------------------------------


class TakesX(nn.Module):
    """A model whose forward takes one tensor ``x``: it cannot take a mapping batch's keys."""

    def __init__(self, vocab: int = 50, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(dim=1))


class NoLogits(nn.Module):
    """A model that returns a mapping without ``logits``."""

    def __init__(self, features: int = 3 * 8 * 8, classes: int = 10):
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.head(x.flatten(1))}


# --- metrics ---------------------------------------------------------------------------------


def logit_norm(model: nn.Module, batch: Any, scale: float = 1.0) -> float:
    """A custom metric as a plain function: the mean L2 norm of the model's logits."""
    x, _ = batch
    return scale * float(model(x).norm(dim=-1).mean())


class MeanMaxProbability(L.DatasetMetric):
    """A custom dataset metric: the mean over samples of the highest softmax probability."""

    needs_target = False

    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        return outputs.softmax(dim=-1).amax(dim=-1).sum(dim=1).double()


def returns_none(model: nn.Module, batch: Any) -> None:
    """A broken custom metric: returns nothing."""
    model(batch[0])


class ReturnsText(L.Metric):
    """A broken custom metric (the loss-landscapes protocol): returns a string."""

    def __call__(self, model_wrapper: Any) -> str:
        return "low"
