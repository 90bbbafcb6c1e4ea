"""Read model checkpoints safely and load them into a model.

Formats: ``torch.save`` files (``.pt``, ``.pth``, ``.bin``) holding a state dict or a dict that
holds one, ``.safetensors``, Lightning ``.ckpt`` files, and ``torch.export`` programs (``.pt2``,
MLflow 3's default for PyTorch models). Pickled Python objects are never unpickled unless the
caller opts in with ``trust_pickle=True``; neither are ``.pt2`` archives, whose loader may
unpickle what they hold.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landscapes.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "TORCH_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "EXPORTED_SUFFIXES",
    "STRIPPABLE_PREFIXES",
    "load_state_dict",
    "load_into",
    "checkpoint_identity",
    "parameter_count",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
EXPORTED_SUFFIXES = (".pt2",)
_ALL_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + EXPORTED_SUFFIXES
# Keys under which training scripts and Lightning nest the model's state dict, in lookup order.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes that wrappers add to every key: LightningModule attributes, DataParallel/DDP, and
# torch.compile.
STRIPPABLE_PREFIXES = ("model.", "net.", "module.", "_orig_mod.")
# BatchNorm statistics: in a state dict but not parameters.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_MAX_LISTED = 10
_MAX_PREFIX_DEPTH = 3

_TRUST_HINT = (
    "Loading it runs arbitrary code from the file. If you trust its source, opt in with "
    "load_state_dict(..., trust_pickle=True) or the config key checkpoint.trust_pickle=true; "
    "better, re-save it as a plain state dict: torch.save(model.state_dict(), path)."
)


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return the model's state dict.

    Args:
        path: A ``.pt``/``.pth``/``.bin`` file (a state dict, or a dict holding one under
            ``"state_dict"``, ``"model_state_dict"`` or ``"model"``), a ``.safetensors`` file,
            a Lightning ``.ckpt`` (its ``"state_dict"``), or a ``.pt2`` program written by
            ``torch.export.save`` (its parameters and persistent buffers). Other suffixes are
            recognised by their leading bytes.
        trust_pickle: Unpickle arbitrary Python objects (``torch.load(weights_only=False)``).
            Only for files from a trusted source; needed for files holding a whole ``nn.Module``
            (MLflow's ``pickle`` format) and for ``.pt2`` files (``torch.export.load``).
        map_location: Device the tensors are loaded onto.

    Returns:
        A new ``dict`` of tensor name to tensor, in the file's order. Wrapper prefixes
        (``model.``, ``module.``) are kept; `load_into` resolves them against the model.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointError: The file is corrupt or truncated, holds no state dict, or holds
            pickled objects and ``trust_pickle`` is False.
    """
    file = _existing_file(path)
    fmt = _detect_format(file)
    if fmt == "safetensors":
        return _load_safetensors(file, map_location)
    if fmt == "pt2":
        return _load_exported(file, trust_pickle=trust_pickle, map_location=map_location)
    obj = _torch_load(file, trust_pickle=trust_pickle, map_location=map_location)
    return _extract_state_dict(obj, file)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Copy a state dict into ``model`` after matching wrapper prefixes, and return ``model``.

    When the checkpoint's keys carry a prefix the model's keys lack (``model.``, ``net.``,
    ``module.``, ``_orig_mod.``, possibly nested), the prefix is stripped and keys outside it
    (other submodules of a LightningModule, for example) are ignored. Everything is checked
    before any tensor is copied, so a failed call leaves ``model`` unchanged.

    As torch's own strict ``load_state_dict``, a missing ``num_batches_tracked`` of a norm layer
    is accepted when the state dict has no version metadata (a plain ``dict``) or an old one;
    the layer keeps its own count. Tied parameters (one tensor under several names, like
    GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) need only one of their names
    in the checkpoint, as ``safetensors.torch.save_model`` writes them; they stay tied.

    Args:
        model: The module to load into (modified in place).
        state_dict: Tensor name to tensor, as returned by `load_state_dict`.
        strict: Require the keys to match exactly (up to the two cases above); with False,
            missing and unexpected keys are skipped. Shapes must match in either mode.

    Returns:
        ``model``, with the checkpoint's tensors.

    Raises:
        CheckpointError: Keys are missing or unexpected (``strict=True``), shapes differ, or
            tied names hold different values; the message lists them.
    """
    target = model.state_dict()
    matched, stripped = _match_prefix(dict(state_dict), target.keys())
    ties = _tied_keys(model, target.keys())
    filled = _fill_ties(matched, ties)
    refilled = _refilled_by_torch(model, getattr(state_dict, "_metadata", None), stripped)
    missing = [k for k in target if k not in filled and k not in refilled]
    unexpected = [k for k in matched if k not in target]
    mismatched = [
        f"{k}: checkpoint {_shape(matched[k])} vs model {_shape(target[k])}"
        for k in target
        if k in matched and matched[k].shape != target[k].shape
    ]
    conflicts = [] if mismatched else _tie_conflicts(matched, ties)
    problems = []
    if strict and missing:
        problems.append(_listing("missing key", "in the model, not in the checkpoint", missing))
    if strict and unexpected:
        problems.append(
            _listing("unexpected key", "in the checkpoint, not in the model", unexpected)
        )
    if mismatched:
        problems.append(_listing("shape mismatch", "checkpoint vs model", mismatched))
    if conflicts:
        problems.append(
            _listing(
                "tie conflict",
                "one tensor in the model, different values in the checkpoint",
                conflicts,
            )
        )
    if problems:
        note = f" (after stripping the prefix {stripped!r})" if stripped else ""
        fix = (
            "\nCheck that the model config (class and its kwargs) is the architecture the "
            "checkpoint was saved from, and that the checkpoint is the right file."
        )
        if conflicts:
            fix += (
                " The checkpoint was saved from a model without these ties: build the model "
                "untied (for transformers models, tie_word_embeddings=False)."
            )
        elif not mismatched and len(missing) < len(target):  # strict=False loads something
            fix += (
                " To load only the keys both have, pass strict=False (in the pipeline, "
                "checkpoint.strict=false)."
            )
        raise CheckpointError(
            f"load_into: the checkpoint does not fit {type(model).__name__}{note}.\n"
            + "\n".join(problems)
            + fix
        )
    if not strict:
        filled = {k: v for k, v in filled.items() if k in target}
    # A plain dict (no version metadata): torch's norm layers fill in num_batches_tracked.
    model.load_state_dict(filled, strict=strict)
    return model


def checkpoint_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identify a checkpoint file for provenance records.

    Args:
        path: The checkpoint file.

    Returns:
        ``{"path": absolute path (str), "sha256": hex digest of the file, "size_bytes": int}``.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
    """
    file = _existing_file(path)
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(file), "sha256": digest.hexdigest(), "size_bytes": file.stat().st_size}


def parameter_count(state_dict_or_model: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Count the scalar parameters of a model or a state dict.

    For a module, counts its parameters (shared ones once), not its buffers. For a state
    dict, counts every tensor's elements except BatchNorm statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``); other buffers cannot be told apart there.

    Args:
        state_dict_or_model: An ``nn.Module`` or a mapping of name to tensor.

    Returns:
        The number of scalars.

    >>> parameter_count(torch.nn.Linear(3, 2))
    8
    """
    if isinstance(state_dict_or_model, nn.Module):
        return sum(p.numel() for p in state_dict_or_model.parameters())
    return sum(
        t.numel()
        for k, t in state_dict_or_model.items()
        if isinstance(t, torch.Tensor) and not k.endswith(_BUFFER_SUFFIXES)
    )


# --- reading -------------------------------------------------------------------------------


def _existing_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser().absolute()
    if not file.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {str(file)!r} does not exist; check the path (checkpoint.path), "
            "remembering that Hydra runs jobs in their own output directory, so give an "
            "absolute path or one under paths.root_dir."
        )
    if file.is_dir():
        raise CheckpointError(
            f"checkpoint {str(file)!r} is a directory; point at the checkpoint file inside it "
            f"(one of {', '.join(_ALL_SUFFIXES)})."
        )
    return file


def _detect_format(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in EXPORTED_SUFFIXES:
        return "pt2"
    with file.open("rb") as handle:
        head = handle.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch >= 1.6) or legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then JSON
        return "safetensors"
    raise CheckpointError(
        f"checkpoint {str(file)!r}: cannot tell its format from the suffix {suffix!r} or its "
        f"first bytes; expected one of {', '.join(_ALL_SUFFIXES)}. "
        "Rename the file with the right suffix."
    )


def _load_safetensors(file: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(file, device=str(map_location)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(file)!r} could not be read as safetensors ({exc}); the file is "
            "corrupt, truncated or not safetensors. Re-download or re-save it."
        ) from exc


def _load_exported(
    file: Path, *, trust_pickle: bool, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    if not trust_pickle:
        raise CheckpointError(
            f"checkpoint {str(file)!r} is a torch.export program (.pt2), and torch.export.load "
            "may unpickle objects stored in it, which runs code from the file. If you trust its "
            "source, opt in with load_state_dict(..., trust_pickle=True) or the config key "
            "checkpoint.trust_pickle=true; better, save a plain state dict: "
            "torch.save(model.state_dict(), path)."
        )
    try:
        program = torch.export.load(file)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint {str(file)!r} could not be read as a torch.export program "
            f"({type(exc).__name__}: {detail}); the file is corrupt, written by another torch "
            "version or uses operators not registered here. Save a plain state dict instead: "
            "torch.save(model.state_dict(), path)."
        ) from exc
    # Parameters and persistent buffers under the exported module's names (= its state dict).
    return {k: v.detach().to(map_location) for k, v in program.state_dict.items()}


def _torch_load(file: Path, *, trust_pickle: bool, map_location: str | torch.device) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if not trust_pickle and detail.startswith(("Unsupported global", "Unsupported class")):
            raise CheckpointError(
                f"checkpoint {str(file)!r} is not a plain state dict: it holds pickled Python "
                f"objects ({detail}). {_TRUST_HINT}"
            ) from exc
        raise _corrupt(file, exc, detail) from exc
    except (AttributeError, ImportError) as exc:
        if not trust_pickle:
            raise _corrupt(file, exc) from exc
        # The pickled class cannot be imported here.
        raise CheckpointError(
            f"checkpoint {str(file)!r} holds a pickled object whose class cannot be imported "
            f"here ({exc}). Make its module importable, or re-save the checkpoint as a plain "
            "state dict: torch.save(model.state_dict(), path)."
        ) from exc
    except Exception as exc:  # zip, EOF, unpickler stack errors: what a damaged file raises
        if not trust_pickle and "TorchScript" in str(exc):
            raise CheckpointError(
                f"checkpoint {str(file)!r} is a TorchScript archive (torch.jit.save), not a plain "
                f"state dict. {_TRUST_HINT}"
            ) from exc
        raise _corrupt(file, exc) from exc


def _unpickler_detail(message: str) -> str:
    """The reason torch's weights-only unpickler gives, e.g. 'Unsupported global: GLOBAL x.Y'."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    if match is None:
        return message.splitlines()[0] if message else ""
    return match.group(1).split(" was not an allowed global")[0].strip()


def _corrupt(file: Path, exc: BaseException, detail: str | None = None) -> CheckpointError:
    if detail is None:
        detail = str(exc).splitlines()[0] if str(exc) else ""
    detail = detail.split(". ")[0]  # torch's first sentence says what failed
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return CheckpointError(
        f"checkpoint {str(file)!r} could not be read as a torch.save file ({detail}); the file "
        "is corrupt, truncated or in another format. Re-download or re-save it."
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if _is_tensor_dict(obj) and obj:
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if _is_tensor_dict(inner) and inner:
                return dict(inner)
        keys = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED])
        raise CheckpointError(
            f"checkpoint {str(file)!r} holds a dict with keys [{keys}] but no state dict: "
            f"expected tensors, or a state dict under one of {', '.join(map(repr, _NESTED_KEYS))}. "
            "Re-save it with torch.save(model.state_dict(), path)."
        )
    raise CheckpointError(
        f"checkpoint {str(file)!r} holds a {type(obj).__name__}, not a state dict. "
        "Re-save it with torch.save(model.state_dict(), path)."
    )


# --- matching ------------------------------------------------------------------------------


def _match_prefix(
    state_dict: dict[str, torch.Tensor], model_keys: Any
) -> tuple[dict[str, torch.Tensor], str]:
    """Strip the chain of wrapper prefixes that matches the most model keys."""
    wanted = set(model_keys)
    allowed = [p for p in STRIPPABLE_PREFIXES if not any(k.startswith(p) for k in wanted)]
    best, best_prefix = state_dict, ""
    best_score = len(wanted.intersection(state_dict))
    frontier = [(state_dict, "")]
    for _ in range(_MAX_PREFIX_DEPTH):
        if best_score == len(wanted) == len(best):
            break
        grown = []
        for current, chain in frontier:
            for prefix in allowed:
                n = len(prefix)
                sub = {k[n:]: v for k, v in current.items() if k.startswith(prefix)}
                if not sub:
                    continue
                grown.append((sub, chain + prefix))
                score = len(wanted.intersection(sub))
                if score > best_score:
                    best, best_prefix, best_score = sub, chain + prefix, score
        frontier = grown
    return best, best_prefix


def _tied_keys(model: nn.Module, keys: Any) -> list[list[str]]:
    """State-dict keys that name one tensor object: tied parameters or shared buffers.

    ``model.state_dict()`` lists every name of a tied parameter (GPT-2's ``lm_head.weight``
    and ``transformer.wte.weight``); ``safetensors.torch.save_model`` keeps only one of them.
    """
    wanted = set(keys)
    names: dict[int, list[str]] = {}
    tensors = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in tensors:
        if name in wanted:
            group = names.setdefault(id(tensor), [])
            if name not in group:
                group.append(name)
    return [group for group in names.values() if len(group) > 1]


def _fill_ties(matched: dict[str, torch.Tensor], ties: list[list[str]]) -> dict[str, torch.Tensor]:
    """``matched`` with each tied name the checkpoint lacks set to a tied name it has."""
    filled = dict(matched)
    for group in ties:
        present = [k for k in group if k in matched]
        if present:
            for k in group:
                filled.setdefault(k, matched[present[0]])
    return filled


def _tie_conflicts(matched: dict[str, torch.Tensor], ties: list[list[str]]) -> list[str]:
    """Tied names the checkpoint holds with different values (saved from an untied model)."""
    conflicts = []
    for group in ties:
        present = [k for k in group if k in matched]
        conflicts += [
            f"{present[0]} != {k}"
            for k in present[1:]
            if not torch.equal(matched[present[0]], matched[k])
        ]
    return conflicts


def _refilled_by_torch(model: nn.Module, metadata: Any, stripped: str) -> set[str]:
    """Keys torch's own strict ``load_state_dict`` fills in when the checkpoint lacks them.

    Norm layers tracking running statistics (``_NormBase``: BatchNorm, SyncBatchNorm,
    InstanceNorm with ``track_running_stats=True``) keep their own ``num_batches_tracked``
    when the checkpoint predates it: when the state dict carries no version metadata for the
    module (a plain ``dict``, as `load_state_dict` returns) or a version below 2.
    """
    refilled = set()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats):
            continue
        version = None
        if isinstance(metadata, Mapping):
            key = (stripped + name) if name else stripped[:-1]
            version = (metadata.get(key) or {}).get("version")
        if version is None or version < 2:
            refilled.add(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
    return refilled


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _listing(what: str, where: str, items: list[str]) -> str:
    n = len(items)
    noun = what if n == 1 else what + ("es" if what.endswith("h") else "s")
    shown = "\n".join(f"  {item}" for item in items[:_MAX_LISTED])
    more = f"\n  ... and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
    return f"{n} {noun} ({where}):\n{shown}{more}"
