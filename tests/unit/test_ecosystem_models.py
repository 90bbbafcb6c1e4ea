"""Real architectures as users bring them (torchvision, timm, transformers), random init, offline.

Every strategy that applies equals the per-point loop, and the value at θ0 equals the model's
own loss on the same data (for HuggingFace models, the ``loss`` they return given ``labels``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscapes as L
from landscapes.errors import FallbackWarning
from tests.conftest import assert_unchanged, snapshot
from tests.ecosystem import require

pytestmark = [
    pytest.mark.requires_models,
    # torch's own note that vmap over CPU attention runs a slower, per-sample kernel
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

RTOL = 1e-5
AXES = [L.axis(-0.5, 0.5, 3), L.axis(-0.25, 0.75, 3)]  # θ0 at [1, 0]: 0.25 is on no axis
THETA0 = (1, 0)


def _images(n: int = 4, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def _tokens(n: int = 3, t: int = 7, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding in the first sequence
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _dirs(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]


def _axes_with_zero() -> list[np.ndarray]:
    return [AXES[0], np.array([0.0, 0.5, 1.0])]


def _every_strategy_equals_the_loop(model, metric, strategies, warn=None):
    dirs, axes = _dirs(model), _axes_with_zero()
    before = snapshot(model)
    loop = L.evaluate(model, metric, dirs, axes, strategy="loop", max_batch_points=3)
    assert_unchanged(model, before)
    for strategy in strategies:
        if warn is not None and strategy in warn:
            with pytest.warns(FallbackWarning, match=warn[strategy]):
                fast = L.evaluate(model, metric, dirs, axes, strategy=strategy, max_batch_points=3)
        else:
            fast = L.evaluate(model, metric, dirs, axes, strategy=strategy, max_batch_points=3)
        assert_unchanged(model, before)
        for name in loop.values:
            np.testing.assert_allclose(fast[name], loop[name], rtol=RTOL, atol=1e-7, err_msg=f"{strategy}: {name}")
    return loop


def test_torchvision_resnet18() -> None:
    tv = require("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x, y = _images()
    metric = [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]
    loop = _every_strategy_equals_the_loop(
        model, metric, ["vmap", "batched"], warn={"batched": "needs a plain nn.Sequential"}
    )
    with torch.no_grad():
        logits = model(x)
    assert loop["loss"][1, 0] == pytest.approx(F.cross_entropy(logits, y).item(), rel=RTOL)
    assert loop["accuracy"][1, 0] == pytest.approx((logits.argmax(1) == y).double().mean().item())


def test_timm_vit() -> None:
    timm = require("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    ).eval()
    x, y = _images()
    metric = [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]
    loop = _every_strategy_equals_the_loop(model, metric, ["vmap"])
    with torch.no_grad():
        want = F.cross_entropy(model(x), y).item()
    assert loop["loss"][1, 0] == pytest.approx(want, rel=RTOL)


def _gpt2():
    tr = require("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return tr.GPT2LMHeadModel(cfg).eval()


def test_transformers_gpt2_dict_batches_with_labels_inside() -> None:
    model = _gpt2()
    batch = _tokens()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    metric = [
        L.Loss(nn.CrossEntropyLoss(), batch, shift=True),
        L.ModelLoss(batch, shift=True, name="model_loss"),
        L.Perplexity(batch, shift=True),
        L.Accuracy(batch, shift=True),
    ]
    loop = _every_strategy_equals_the_loop(model, metric, ["vmap"])
    with torch.no_grad():
        out = model(**batch)
    i, j = THETA0
    assert loop["loss"][i, j] == pytest.approx(out.loss.item(), rel=RTOL)
    assert loop["model_loss"][i, j] == pytest.approx(out.loss.item(), rel=RTOL)
    assert loop["perplexity"][i, j] == pytest.approx(np.exp(out.loss.item()), rel=RTOL)
    pred, target = out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    counted = target != -100
    assert loop["accuracy"][i, j] == pytest.approx(((pred == target) & counted).sum().item() / counted.sum().item())


def test_transformers_gpt2_over_a_dataloader_is_the_mean_over_every_token() -> None:
    """Batches with different numbers of counted tokens: the value is the mean over all of
    them, not the mean of the batches' means."""
    model = _gpt2()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 100, (7, 6), generator=g)
    labels = ids.clone()
    labels[0, 2:] = -100
    labels[3, 4:] = -100
    samples = [{"input_ids": ids[i], "labels": labels[i]} for i in range(7)]
    loader = torch.utils.data.DataLoader(samples, batch_size=3)  # 3 + 3 + 1 sequences
    dirs = _dirs(model)
    land = L.evaluate(model, L.Loss(F.cross_entropy, loader, shift=True), dirs, _axes_with_zero())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    assert land["loss"][THETA0] == pytest.approx(want.item(), rel=RTOL)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(0.5 * dirs[0][name] + 1.0 * dirs[1][name])
        logits = moved(input_ids=ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    assert land["loss"][2, 2] == pytest.approx(want.item(), rel=RTOL)


def test_transformers_bert_sequence_classification() -> None:
    tr = require("transformers")
    torch.manual_seed(0)
    cfg = tr.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )
    model = tr.BertForSequenceClassification(cfg).eval()
    batch = {**_tokens(), "labels": torch.tensor([0, 2, 1])}
    metric = [L.Loss(nn.CrossEntropyLoss(), batch), L.ModelLoss(batch, name="model_loss"), L.Accuracy(batch)]
    loop = _every_strategy_equals_the_loop(model, metric, ["vmap"])
    with torch.no_grad():
        out = model(**batch)
    assert loop["loss"][THETA0] == pytest.approx(out.loss.item(), rel=RTOL)
    assert loop["model_loss"][THETA0] == pytest.approx(out.loss.item(), rel=RTOL)
    # the same model on (input_ids, attention_mask) tuples, the target beside them
    pair = ((batch["input_ids"], batch["attention_mask"]), batch["labels"])
    tuple_land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), *pair), _dirs(model), _axes_with_zero(), strategy="vmap")
    np.testing.assert_allclose(tuple_land["loss"], loop["loss"], rtol=RTOL)


def test_torchvision_resnet18_recompute_bn_equals_update_bn_on_a_copy() -> None:
    tv = require("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x, y = _images(8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    dirs, axes = _dirs(model), [np.array([0.0, 0.5]), np.array([-0.25, 0.0])]
    before = snapshot(model)
    land = L.evaluate(model, L.Loss(nn.CrossEntropyLoss(), loader), dirs, axes, model_mode="recompute_bn", bn_batches=2)
    assert_unchanged(model, before)  # θ0's statistics come back bit for bit
    assert (land.metadata["model_mode"], land.metadata["bn_batches"]) == ("recompute_bn", 2)
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            ref = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p.add_(float(a) * dirs[0][name] + float(b) * dirs[1][name])
                torch.optim.swa_utils.update_bn(loader, ref)  # reset, momentum=None, train mode
                ref.eval()
                want = F.cross_entropy(ref(x), y).item()
            assert land["loss"][i, j] == pytest.approx(want, rel=RTOL)
