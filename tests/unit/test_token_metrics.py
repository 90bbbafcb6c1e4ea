"""Token-level metrics over (N, T, C) outputs equal F.cross_entropy / argmax accuracy on the
flattened positions, skipping ignore_index, over whole datasets of uneven batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscapes as L

RTOL = 1e-5
VOCAB = 11


class TinyLM(nn.Module):
    """Embedding → tanh → Linear: logits (N, T, VOCAB) from input_ids (N, T)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h)


def _data(n: int = 13, t: int = 5, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    target = torch.randint(0, VOCAB, (n, t), generator=g)
    if padded:  # uneven numbers of counted tokens per sequence, hence per batch
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        target[torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
    return ids, target


def _moved(model: nn.Module, dirs, coords) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(sum(float(c) * d[name] for c, d in zip(coords, dirs, strict=True)))
    return ref


def _reference(model, ids, target, *, shift=False, **ce):
    with torch.no_grad():
        logits = model(ids)
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    flat, t = logits.reshape(-1, VOCAB), target.reshape(-1)
    loss = F.cross_entropy(flat, t, **ce).item()
    counted = t != ce.get("ignore_index", -100)
    acc = ((flat.argmax(-1) == t) & counted).sum().item() / counted.sum().item()
    return loss, acc


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("shift", [False, True], ids=["aligned", "shifted"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_token_metrics_over_a_dataloader_equal_the_flattened_reference(padded, shift, strategy) -> None:
    model = TinyLM()
    ids, target = _data(padded=padded)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, target), batch_size=5)  # 5, 5, 3
    metric = [
        L.Loss(nn.CrossEntropyLoss(), loader, shift=shift),
        L.Accuracy(loader, shift=shift),
        L.Perplexity(loader, shift=shift),
    ]
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    axes = [L.axis(-1, 1, 3), L.axis(0, 1, 2)]
    land = L.evaluate(model, metric, dirs, axes, strategy=strategy)
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            loss, acc = _reference(_moved(model, dirs, (a, b)), ids, target, shift=shift)
            assert land["loss"][i, j] == pytest.approx(loss, rel=RTOL)
            assert land["perplexity"][i, j] == pytest.approx(np.exp(loss), rel=RTOL)
            assert land["accuracy"][i, j] == pytest.approx(acc, abs=1e-12)


def test_a_perfect_token_model_scores_one_not_the_sequence_length() -> None:
    """The bug of the issue: N·T positions counted, not N."""
    ids, _ = _data(n=4, t=10, padded=False)
    model = nn.Sequential(nn.Embedding(VOCAB, VOCAB), nn.Identity())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(VOCAB) * 10)
    assert L.point(model, L.Accuracy(ids, ids)) == 1.0


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(ignore_index=3),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, VOCAB)),
        nn.CrossEntropyLoss(reduction="sum"),
    ],
    ids=["plain", "ignore-3", "label-smoothing", "class-weights", "sum"],
)
def test_cross_entropy_options_over_tokens_equal_the_loss_on_flattened_tensors(loss_fn) -> None:
    model = TinyLM()
    ids, target = _data()
    target[target == -100] = loss_fn.ignore_index
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, target), batch_size=4)
    land = L.evaluate(model, L.Loss(loss_fn, loader), [L.random_direction(model, seed=2)], [L.axis(0, 1, 3)])
    with torch.no_grad():
        want = loss_fn(model(ids).reshape(-1, VOCAB), target.reshape(-1)).item()
    assert land["loss"][0] == pytest.approx(want, rel=RTOL)


def test_dict_batches_with_the_labels_inside() -> None:
    model = TinyLM()
    ids, target = _data()
    mask = (target != -100).long()
    samples = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": target[i]} for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(samples, batch_size=6)
    land = L.evaluate(model, [L.Loss(F.cross_entropy, loader), L.Accuracy(loader)], [L.random_direction(model, seed=0)], [L.axis(0, 1, 2)])
    with torch.no_grad():
        logits = model(ids, mask)
    assert land["loss"][0] == pytest.approx(F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).item(), rel=RTOL)
    one = L.point(model, L.Loss(F.cross_entropy, {"input_ids": ids, "attention_mask": mask, "labels": target}))
    assert one == pytest.approx(land["loss"][0], rel=RTOL)


def test_batches_whose_targets_are_all_ignored_add_nothing() -> None:
    model = TinyLM()
    ids, target = _data(n=6, padded=False)
    target[:3] = -100
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, target), batch_size=3)
    got = L.point(model, L.Loss(nn.CrossEntropyLoss(), loader))
    with torch.no_grad():
        want = F.cross_entropy(model(ids).reshape(-1, VOCAB), target.reshape(-1)).item()
    assert got == pytest.approx(want, rel=RTOL)


def test_sample_level_cross_entropy_with_ignored_targets_is_the_dataset_mean(mlp, data) -> None:
    """(N, C) outputs: the mean over the non-ignored samples of the whole dataset."""
    x, y = data
    y = y.clone()
    y[:7] = -100  # all in the first batch of 16
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    for strategy in ("loop", "batched"):
        land = L.evaluate(mlp, L.Loss(nn.CrossEntropyLoss(), loader), [L.random_direction(mlp, seed=0)], [L.axis(0, 1, 3)], strategy=strategy)
        with torch.no_grad():
            want = F.cross_entropy(mlp(x), y).item()
        assert land["loss"][0] == pytest.approx(want, rel=RTOL)
