"""Checkpoint reading and loading, on real files written with torch.save and safetensors."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from landscapes.checkpoints import (
    checkpoint_identity,
    load_into,
    load_state_dict,
    parameter_count,
)
from landscapes.errors import CheckpointError, CheckpointNotFoundError
from tests.ecosystem import require


def _model(seed: int = 0, hidden: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))


class _Wrapper(nn.Module):
    """A model whose own keys start with ``net.``, like the demo models."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _model(seed)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def source() -> nn.Sequential:
    return _model(seed=1)


# --- formats -------------------------------------------------------------------------------


def _save_plain(sd, path):
    torch.save(sd, path)


def _save_legacy(sd, path):
    torch.save(sd, path, _use_new_zipfile_serialization=False)


def _save_nested(key):
    def save(sd, path):
        torch.save({key: sd, "epoch": 7, "note": "trained"}, path)

    return save


def _save_safetensors(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.mark.parametrize(
    ("name", "save"),
    [
        pytest.param("m.pt", _save_plain, id="pt"),
        pytest.param("m.pth", _save_plain, id="pth"),
        pytest.param("m.bin", _save_plain, id="bin"),
        pytest.param("m.pt", _save_legacy, id="pt-legacy-serialization"),
        pytest.param("m.pt", _save_nested("state_dict"), id="nested-state_dict"),
        pytest.param("m.pth", _save_nested("model_state_dict"), id="nested-model_state_dict"),
        pytest.param("m.pt", _save_nested("model"), id="nested-model"),
        pytest.param("m.safetensors", _save_safetensors, id="safetensors"),
        pytest.param("m.weights", _save_plain, id="unknown-suffix-torch-sniffed"),
        pytest.param("m.st", _save_safetensors, id="unknown-suffix-safetensors-sniffed"),
    ],
)
def test_formats_round_trip(tmp_path: Path, source: nn.Module, name: str, save) -> None:
    path = tmp_path / name
    save(source.state_dict(), path)
    sd = load_state_dict(path)
    _assert_same(sd, dict(source.state_dict()))
    target = load_into(_model(seed=2), sd)
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


def test_str_path_and_map_location(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "m.pt"
    torch.save(source.state_dict(), path)
    sd = load_state_dict(str(path), map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in sd.values())


def _lightning_checkpoint(model: nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss_fn.weight"] = torch.ones(2)  # another submodule of the LightningModule
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1, "hidden": [5]},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
    }


def test_lightning_ckpt_with_model_prefix(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(_lightning_checkpoint(source), path)
    sd = load_state_dict(path)
    assert "model.0.weight" in sd and "loss_fn.weight" in sd
    target = load_into(_model(seed=2), sd)
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


def test_prefix_kept_when_the_model_has_it(tmp_path: Path) -> None:
    source = _Wrapper(seed=1)
    path = tmp_path / "lit.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    target = load_into(_Wrapper(seed=2), load_state_dict(path))
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


def test_nested_prefixes_stripped(source: nn.Module) -> None:
    sd = {f"model.module.{k}": v for k, v in source.state_dict().items()}
    target = load_into(_model(seed=2), sd)
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


# --- pickled objects -----------------------------------------------------------------------


def test_full_module_refused_without_opt_in(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(source, path)
    with pytest.raises(CheckpointError, match="not a plain state dict") as info:
        load_state_dict(path)
    message = str(info.value)
    assert "arbitrary code" in message
    assert "trust_pickle=True" in message and "checkpoint.trust_pickle=true" in message
    assert str(path) in message
    assert "torch.nn.modules.container.Sequential" in message


def test_full_module_accepted_with_opt_in(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(source, path)
    sd = load_state_dict(path, trust_pickle=True)
    _assert_same(sd, dict(source.state_dict()))


def test_pickled_object_in_dict_refused(tmp_path: Path, source: nn.Module) -> None:
    import argparse

    path = tmp_path / "with_namespace.ckpt"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"not a plain state dict.*trust_pickle=True"):
        load_state_dict(path)
    _assert_same(load_state_dict(path, trust_pickle=True), dict(source.state_dict()))


def test_dict_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"epoch": 3, "weights": [1.0, 2.0]}, path)
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['epoch', 'weights'\]"):
        load_state_dict(path)


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_state_dict(path)


# --- bad files -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{str(path)!r} does not exist")):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        checkpoint_identity(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        pytest.param("m.pt", "truncate", "a torch.save file", id="truncated-pt"),
        pytest.param("m.pt", b"", "a torch.save file", id="empty-pt"),
        pytest.param("m.ckpt", b"not a checkpoint at all", "a torch.save file", id="garbage"),
        pytest.param("m.safetensors", "truncate", "safetensors", id="truncated-safetensors"),
        pytest.param("m.safetensors", b"garbage123456789", "safetensors", id="garbage-st"),
    ],
)
def test_corrupt_file(tmp_path: Path, source: nn.Module, name: str, content, fmt: str) -> None:
    path = tmp_path / name
    if content == "truncate":
        if fmt == "safetensors":
            _save_safetensors(source.state_dict(), path)
        else:
            torch.save(source.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    pattern = rf"{re.escape(repr(str(path)))} could not be read as {re.escape(fmt)}.*corrupt"
    with pytest.raises(CheckpointError, match=pattern):
        load_state_dict(path)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "m.weights"
    path.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="cannot tell its format.*Rename the file"):
        load_state_dict(path)


# --- mismatches ----------------------------------------------------------------------------


def test_missing_keys(source: nn.Module) -> None:
    sd = dict(source.state_dict())
    del sd["2.bias"], sd["0.bias"]
    target = _model(seed=2)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError,
        match=r"2 missing keys \(in the model, not in the checkpoint\):\n  0.bias\n  2.bias",
    ) as info:
        load_into(target, sd)
    assert "right file" in str(info.value) and "model config" in str(info.value)
    _assert_same(dict(target.state_dict()), before)


def test_unexpected_keys(source: nn.Module) -> None:
    sd = dict(source.state_dict())
    sd["4.weight"] = torch.zeros(2, 2)
    with pytest.raises(
        CheckpointError,
        match=r"1 unexpected key \(in the checkpoint, not in the model\):\n  4.weight",
    ):
        load_into(_model(seed=2), sd)


def test_shape_mismatch(source: nn.Module) -> None:
    target = _model(seed=2, hidden=7)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError,
        match=r"3 shape mismatches \(checkpoint vs model\):\n"
        r"  0.weight: checkpoint \(5, 3\) vs model \(7, 3\)\n  0.bias: checkpoint \(5\) vs model \(7\)",
    ):
        load_into(target, source.state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(target, source.state_dict(), strict=False)
    _assert_same(dict(target.state_dict()), before)


def test_mismatch_message_mentions_stripped_prefix(source: nn.Module) -> None:
    sd = {f"model.{k}": v for k, v in source.state_dict().items() if k != "2.bias"}
    with pytest.raises(CheckpointError, match=r"after stripping the prefix 'model\.'"):
        load_into(_model(seed=2), sd)


def test_long_lists_are_truncated() -> None:
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(
        CheckpointError, match=r"24 missing keys [^\n]*\n(  \S+\n){9}  4.bias\n  \.\.\. and 14 more"
    ) as info:
        load_into(target, {})
    assert "5.weight" not in str(info.value)


def test_non_strict_allows_missing_and_unexpected(source: nn.Module) -> None:
    sd = dict(source.state_dict())
    del sd["2.bias"]
    sd["extra"] = torch.zeros(1)
    target = _model(seed=2)
    before = _snapshot(target)
    load_into(target, sd, strict=False)
    torch.testing.assert_close(target.state_dict()["0.weight"], source.state_dict()["0.weight"])
    torch.testing.assert_close(target.state_dict()["2.bias"], before["2.bias"])


# --- identity ------------------------------------------------------------------------------


def test_checkpoint_identity(tmp_path: Path, source: nn.Module, monkeypatch) -> None:
    path = tmp_path / "m.pt"
    torch.save(source.state_dict(), path)
    monkeypatch.chdir(tmp_path)
    identity = checkpoint_identity("m.pt")
    data = path.read_bytes()
    assert identity == {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }
    assert Path(identity["path"]).is_absolute()


def test_parameter_count() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    expected = (3 * 4 + 4) + (4 + 4) + (4 * 2 + 2)
    assert parameter_count(model) == expected
    assert parameter_count(model.state_dict()) == expected


def test_strict_failure_suggests_non_strict(source: nn.Module) -> None:
    sd = dict(source.state_dict())
    del sd["2.bias"]
    with pytest.raises(
        CheckpointError, match=r"strict=False \(in the pipeline, checkpoint\.strict=false\)"
    ):
        load_into(_model(seed=2), sd)
    # Shapes must match in either mode, so the hint would not help there.
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        load_into(_model(seed=2, hidden=7), sd)
    assert "strict" not in str(info.value)


# --- norm layers: num_batches_tracked ------------------------------------------------------


def _bn_model(norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = {
        "batchnorm1d": lambda: nn.BatchNorm1d(4),
        "instancenorm1d-tracking": lambda: nn.InstanceNorm1d(4, track_running_stats=True),
    }[norm]()
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
    model[1].running_mean.uniform_()
    model[1].num_batches_tracked.fill_(10 + seed)
    return model


@pytest.mark.parametrize("norm", ["batchnorm1d", "instancenorm1d-tracking"])
def test_missing_num_batches_tracked_accepted_like_torch(tmp_path: Path, norm: str) -> None:
    source = _bn_model(norm, seed=1)
    sd = dict(source.state_dict())
    del sd["1.num_batches_tracked"]  # a checkpoint from before the buffer existed
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    reference = _bn_model(norm, seed=2)
    reference.load_state_dict(dict(sd), strict=True)  # what torch itself accepts
    target = load_into(_bn_model(norm, seed=2), load_state_dict(path), strict=True)
    _assert_same(dict(target.state_dict()), dict(reference.state_dict()))
    assert target[1].num_batches_tracked.item() == 12  # torch keeps the layer's own count
    torch.testing.assert_close(target[1].running_mean, source[1].running_mean)


def test_missing_num_batches_tracked_refused_like_torch_with_metadata() -> None:
    # model.state_dict() records the BatchNorm version (2, with the buffer): torch refuses.
    sd = _bn_model("batchnorm1d", seed=1).state_dict()
    del sd["1.num_batches_tracked"]
    with pytest.raises(RuntimeError, match="Missing key"):
        _bn_model("batchnorm1d", seed=2).load_state_dict(sd, strict=True)
    target = _bn_model("batchnorm1d", seed=2)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"1 missing key .*\n  1\.num_batches_tracked"):
        load_into(target, sd)
    _assert_same(dict(target.state_dict()), before)


def test_missing_running_stats_still_refused() -> None:
    sd = dict(_bn_model("batchnorm1d", seed=1).state_dict())
    del sd["1.running_mean"], sd["1.num_batches_tracked"]
    with pytest.raises(CheckpointError, match=r"1 missing key [^\n]*\n  1\.running_mean\n"):
        load_into(_bn_model("batchnorm1d", seed=2), sd)


# --- tied parameters -----------------------------------------------------------------------


class _TiedLM(nn.Module):
    """Embedding and decoder share one weight, as language models tie them."""

    def __init__(self, seed: int = 0, tied: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 7)
        if tied:
            self.decoder.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.body(self.embed(x))))


def _save_model_safetensors(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))  # writes one of the tied names only


def _save_state_dict(model: nn.Module, path: Path) -> None:
    torch.save(model.state_dict(), path)  # keeps both names


@pytest.mark.parametrize(
    ("name", "save"),
    [
        pytest.param("m.safetensors", _save_model_safetensors, id="safetensors-save_model"),
        pytest.param("m.pt", _save_state_dict, id="torch-save-state_dict"),
    ],
)
def test_tied_model_round_trip(tmp_path: Path, name: str, save) -> None:
    source = _TiedLM(seed=1)
    save(source, tmp_path / name)
    sd = load_state_dict(tmp_path / name)
    target = load_into(_TiedLM(seed=2), sd, strict=True)
    assert target.decoder.weight is target.embed.weight
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


@pytest.mark.parametrize("kept", ["embed.weight", "decoder.weight"])
def test_tied_either_name_is_enough(kept: str) -> None:
    source = _TiedLM(seed=1)
    dropped = ({"embed.weight", "decoder.weight"} - {kept}).pop()
    sd = {k: v for k, v in source.state_dict().items() if k != dropped}
    target = load_into(_TiedLM(seed=2), {f"model.{k}": v for k, v in sd.items()})
    assert target.decoder.weight is target.embed.weight
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


def test_tied_names_with_different_values_refused() -> None:
    untied = _TiedLM(seed=1, tied=False)
    target = _TiedLM(seed=2)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError,
        match=r"1 tie conflict \(one tensor in the model, different values in the checkpoint\):\n"
        r"  embed\.weight != decoder\.weight\n.*tie_word_embeddings=False",
    ):
        load_into(target, untied.state_dict(), strict=False)
    _assert_same(dict(target.state_dict()), before)
    assert target.decoder.weight is target.embed.weight


def test_tied_checkpoint_into_untied_model_needs_both(tmp_path: Path) -> None:
    _save_model_safetensors(_TiedLM(seed=1), tmp_path / "m.safetensors")
    sd = load_state_dict(tmp_path / "m.safetensors")
    assert len({"embed.weight", "decoder.weight"} & set(sd)) == 1
    with pytest.raises(CheckpointError, match=r"(?s)1 missing key .*checkpoint\.strict=false"):
        load_into(_TiedLM(seed=2, tied=False), sd)


# --- a real tied model: transformers' GPT-2 ------------------------------------------------


def _gpt2(seed: int, **overrides):
    if importlib.util.find_spec("torchvision") is not None:
        require("torchvision")  # transformers imports it; this declares its missing ops
    transformers = require("transformers")
    config = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 16}
    config.update(bos_token_id=0, eos_token_id=1, **overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_model

    source = _gpt2(seed=1)
    path = tmp_path_factory.mktemp("gpt2") / "model.safetensors"
    save_model(source, str(path))
    return path, {k: v.clone() for k, v in source.state_dict().items()}


@pytest.mark.requires_models
def test_gpt2_tied_safetensors_loads_strict(gpt2_file) -> None:
    path, expected = gpt2_file
    sd = load_state_dict(path)
    assert "lm_head.weight" in sd and "transformer.wte.weight" not in sd
    target = load_into(_gpt2(seed=2), sd, strict=True)
    assert target.lm_head.weight is target.transformer.wte.weight
    _assert_same(dict(target.state_dict()), expected)


@pytest.mark.requires_models
def test_gpt2_state_dict_with_both_names_loads(tmp_path: Path) -> None:
    source = _gpt2(seed=1)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    target = load_into(_gpt2(seed=2), load_state_dict(tmp_path / "pytorch_model.bin"))
    assert target.lm_head.weight is target.transformer.wte.weight
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))
    ids = torch.arange(8).reshape(1, 8)
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=0, atol=0)


@pytest.mark.requires_models
@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        pytest.param({"n_layer": 2}, r"missing keys [^\n]*\n  transformer\.h\.1\.", id="deeper"),
        pytest.param(
            {"n_embd": 32},
            r"16 shape mismatches [^\n]*\n  transformer\.wpe\.weight: checkpoint \(16, 16\) vs model \(16, 32\)",
            id="wider",
        ),
    ],
)
def test_gpt2_other_architecture_refused(gpt2_file, overrides: dict, pattern: str) -> None:
    path, _ = gpt2_file
    target = _gpt2(seed=2, **overrides)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointError, match=rf"does not fit GPT2LMHeadModel\.\n(.*\n)*.*{pattern}"
    ):
        load_into(target, load_state_dict(path))
    _assert_same(dict(target.state_dict()), before)


@pytest.mark.requires_models
def test_gpt2_into_own_model_refused(gpt2_file) -> None:
    path, _ = gpt2_file
    with pytest.raises(
        CheckpointError,
        match=r"does not fit _TiedLM\.\n5 missing keys .*\n(  .*\n){5}16 unexpected keys .*\n(.*\n){11}"
        r"Check that the model config .* the right file\.$",
    ):
        load_into(_TiedLM(seed=2), load_state_dict(path))  # nothing in common: no strict=false hint


# --- torch.export programs and TorchScript archives ----------------------------------------


def test_exported_program_loads_with_opt_in(tmp_path: Path) -> None:
    source = _TiedLM(seed=1)
    source.register_buffer("scale", torch.ones(1), persistent=False)  # not in a state dict
    program = torch.export.export(source, (torch.randint(0, 7, (5,)),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    sd = load_state_dict(path, trust_pickle=True)
    assert "scale" not in sd
    _assert_same(sd, dict(source.state_dict()))
    target = load_into(_TiedLM(seed=2), sd)
    assert target.decoder.weight is target.embed.weight
    _assert_same(dict(target.state_dict()), dict(source.state_dict()))


def test_exported_program_refused_without_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK not read")
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(repr(str(path)))} is a torch\.export program \(\.pt2\).*"
        r"checkpoint\.trust_pickle=true.*torch\.save\(model\.state_dict\(\), path\)",
    ):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match=r"could not be read as a torch\.export program"):
        load_state_dict(path, trust_pickle=True)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*looks like a TorchScript archive:UserWarning")
def test_torchscript_archive(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(source), path)
    with pytest.raises(
        CheckpointError, match=r"is a TorchScript archive \(torch\.jit\.save\).*trust_pickle=True"
    ):
        load_state_dict(path)
    sd = load_state_dict(path, trust_pickle=True)
    _assert_same(sd, dict(source.state_dict()))
