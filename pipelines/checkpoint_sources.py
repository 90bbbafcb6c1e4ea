"""Checkpoints that come from MLflow: the file to load inside a download, and the run behind a URI.

``mlflow.artifacts.download_artifacts`` returns a file or a folder. A folder is either an
artifact folder holding one checkpoint file (``mlflow.pytorch.log_state_dict`` writes
``state_dict.pth``), or an MLflow model written by ``mlflow.pytorch.log_model``, whose
``MLmodel`` names the flavor and whose ``data/`` holds, in MLflow 3.x:

- ``model.pt2``: a ``torch.export`` program, the default (``serialization_format="pt2"``);
- ``model.pth``: a whole module pickled with cloudpickle (``serialization_format="pickle"``,
  the default on Databricks), or a TorchScript archive when a scripted module was logged.

All three need ``checkpoint.trust_pickle=true``: loading them can run code from the file.
`landscapes.checkpoints.load_state_dict` then returns the module's state dict.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from landscapes.checkpoints import EXPORTED_SUFFIXES, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from landscapes.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["mlflow_model_format", "resolve_checkpoint_file", "source_run_of"]

MLMODEL = "MLmodel"
_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + EXPORTED_SUFFIXES
_MAX_LISTED = 10
_LOG_STATE_DICT = (
    "mlflow.pytorch.log_state_dict(model.state_dict(), artifact_path='model') and set "
    "{key}=runs:/<run_id>/model/state_dict.pth"
)


def resolve_checkpoint_file(
    local: str | Path,
    uri: str,
    *,
    trust_pickle: bool = False,
    key: str = "checkpoint.path",
) -> Path:
    """The checkpoint file to load from what MLflow downloaded for ``uri``.

    Args:
        local: What ``mlflow.artifacts.download_artifacts(artifact_uri=uri)`` returned.
        uri: The URI it was downloaded from (``runs:/``, ``models:/``, ``mlflow-artifacts:/``),
            for messages.
        trust_pickle: The value of ``checkpoint.trust_pickle``: whether an MLflow model whose
            file can run code when loaded (pickle, TorchScript, pt2) may be returned.
        key: The config key that named ``uri``, for messages.

    Returns:
        ``local`` itself when it is a file; the one checkpoint file in an artifact folder; or
        the model file of an MLflow PyTorch model (``data/model.pth`` or ``data/model.pt2``),
        which `landscapes.checkpoints.load_state_dict` reads with ``trust_pickle=True``.

    Raises:
        CheckpointNotFoundError: ``local`` does not exist.
        CheckpointError: The folder holds no checkpoint or several; or it is an MLflow model
            whose format needs ``trust_pickle`` (the message names the format and the fixes),
            or one with no PyTorch weights.
    """
    local = Path(local)
    if local.is_file():
        return local
    if not local.is_dir():
        raise CheckpointNotFoundError(
            f"{key}={uri!r}: MLflow's download {str(local)!r} does not exist; download it again "
            "(check the tracking URI and that the artifact was logged)."
        )
    if (local / MLMODEL).is_file():
        return _model_file(local, uri, trust_pickle=trust_pickle, key=key)
    models = sorted(p.parent for p in local.rglob(MLMODEL))
    files = [p for p in _checkpoint_files(local) if not any(m in p.parents for m in models)]
    if len(files) == 1 and not models:
        return files[0]
    if not files and len(models) == 1:
        return _model_file(models[0], uri, trust_pickle=trust_pickle, key=key)
    if not files and not models:
        found = _names(local, [p for p in sorted(local.rglob("*")) if p.is_file()])
        raise CheckpointError(
            f"{key}={uri!r}: the downloaded folder holds no checkpoint file "
            f"({', '.join(_SUFFIXES)}) and no MLflow model (found [{found}]); point {key} at the "
            "artifact that holds the weights, e.g. runs:/<run_id>/checkpoints/epoch_004.pt."
        )
    choices = _names(local, files + models, uri)
    raise CheckpointError(
        f"{key}={uri!r} is a folder with {len(files)} checkpoint file(s) and {len(models)} "
        f"MLflow model(s): [{choices}]; point {key} at one of them."
    )


def mlflow_model_format(model_dir: str | Path) -> str | None:
    """The format of an MLflow PyTorch model folder (one holding an ``MLmodel`` file).

    Args:
        model_dir: The model folder.

    Returns:
        ``"pt2"`` (``data/model.pt2``, a ``torch.export`` program), ``"pickle"``
        (``data/model.pth``, a whole pickled module), ``"torchscript"`` (``data/model.pth``
        written by ``torch.jit.save``), or None when the folder has no ``pytorch`` flavor or
        none of these files.
    """
    data = _pytorch_data_dir(Path(model_dir))
    if data is None:
        return None
    if (data / "model.pt2").is_file():
        return "pt2"
    pth = data / "model.pth"
    if pth.is_file():
        return "torchscript" if _is_torchscript(pth) else "pickle"
    return None


def source_run_of(
    uri: str, *, client: MlflowClient | None = None, key: str = "checkpoint.path"
) -> str | None:
    """The MLflow run that produced the checkpoint behind ``uri`` (the training run).

    Args:
        uri: ``runs:/<run_id>/...``; ``models:/<name>/<version>``, ``models:/<name>/latest``,
            ``models:/<name>/<stage>``, ``models:/<name>@<alias>``; or ``models:/<model_id>``
            (an MLflow 3 logged model, ``m-...``). Other URIs give None.
        client: The client to ask; by default one for the current tracking and registry URIs.
        key: The config key that named ``uri``, for messages.

    Returns:
        The run id, or None when the URI names no run or the model version has no source run.

    Raises:
        CheckpointNotFoundError: The registry has no such model, version, alias or logged model.
    """
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].lstrip("/").split("/")[0] or None
    if not uri.startswith("models:/"):
        return None
    parts = uri[len("models:/") :].strip("/").split("/")
    client = client or MlflowClient()
    try:
        if len(parts) == 1 and "@" in parts[0]:
            name, alias = parts[0].rsplit("@", 1)
            run_id = client.get_model_version_by_alias(name, alias).run_id
        elif len(parts) == 1:
            run_id = client.get_logged_model(parts[0]).source_run_id
        elif parts[1].isdigit():
            run_id = client.get_model_version(parts[0], parts[1]).run_id
        else:
            versions = _versions(client, parts[0], parts[1])
            if not versions:
                where = "at all" if parts[1].lower() == "latest" else f"in stage {parts[1]!r}"
                raise CheckpointNotFoundError(
                    f"{key}={uri!r}: the registered model {parts[0]!r} has no version {where}; "
                    f"register one or name a version: models:/{parts[0]}/<version>."
                )
            run_id = max(versions, key=lambda v: int(v.version)).run_id
    except MlflowException as err:
        raise CheckpointNotFoundError(
            f"{key}={uri!r}: the model registry does not know it ({err.message.splitlines()[0].rstrip('.')}); "
            "check the model name, version or alias and the tracking URI."
        ) from err
    return run_id or None


# --- helpers -------------------------------------------------------------------------------


def _versions(client: MlflowClient, name: str, suffix: str) -> list:
    """The versions of a registered model, or those in a stage (stages are deprecated in MLflow)."""
    if suffix.lower() == "latest":
        return list(client.search_model_versions(f"name = '{name}'"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return list(client.get_latest_versions(name, [suffix]))


def _model_file(model_dir: Path, uri: str, *, trust_pickle: bool, key: str) -> Path:
    fmt = mlflow_model_format(model_dir)
    if fmt is None:
        if _pytorch_data_dir(model_dir) is None:
            # Another flavor (transformers, for one) may keep its weights as a checkpoint file.
            files = _checkpoint_files(model_dir)
            if len(files) == 1:
                return files[0]
            flavors = ", ".join(_flavors(model_dir)) or "none"
            raise CheckpointError(
                f"{key}={uri!r} is an MLflow model of flavor(s) {flavors}, with "
                f"{len(files)} checkpoint files; log it with mlflow.pytorch.log_model, or log "
                f"its weights: {_LOG_STATE_DICT.format(key=key)}."
            )
        found = _names(model_dir, [p for p in sorted(model_dir.rglob("*")) if p.is_file()])
        raise CheckpointError(
            f"{key}={uri!r} is an MLflow PyTorch model without data/model.pth or data/model.pt2 "
            f"(found [{found}]); log it again with mlflow.pytorch.log_model, or log its weights: "
            f"{_LOG_STATE_DICT.format(key=key)}."
        )
    data = _pytorch_data_dir(model_dir)
    assert data is not None
    file = data / ("model.pt2" if fmt == "pt2" else "model.pth")
    if trust_pickle:
        return file
    rel = file.relative_to(model_dir).as_posix()
    what = {
        "pt2": "MLflow 3's default for mlflow.pytorch.log_model: "
        f"{rel} is a torch.export program, and torch.export.load may unpickle objects in it",
        "pickle": f"{rel} holds a whole module pickled with cloudpickle, and unpickling it runs "
        "code from the file",
        "torchscript": f"{rel} is a TorchScript archive (torch.jit.save), and loading it runs "
        "its code",
    }[fmt]
    raise CheckpointError(
        f"{key}={uri!r} is an MLflow model in {fmt!r} format ({what}). If you trust its source, "
        f"set checkpoint.trust_pickle=true to read its weights; better, log them as a state dict: "
        f"{_LOG_STATE_DICT.format(key=key)}."
    )


def _pytorch_data_dir(model_dir: Path) -> Path | None:
    from mlflow.models import Model

    try:
        flavor = Model.load(str(model_dir / MLMODEL)).flavors.get("pytorch")
    except Exception:  # an unreadable MLmodel: treat the folder as a plain one
        return None
    if not isinstance(flavor, dict):
        return None
    return model_dir / str(flavor.get("model_data") or "data")


def _flavors(model_dir: Path) -> list[str]:
    from mlflow.models import Model

    try:
        return sorted(Model.load(str(model_dir / MLMODEL)).flavors)
    except Exception:
        return []


def _is_torchscript(file: Path) -> bool:
    try:
        with zipfile.ZipFile(file) as archive:
            return any(n.split("/", 1)[-1].startswith("code/") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _checkpoint_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in _SUFFIXES]


def _names(root: Path, paths: list[Path], uri: str | None = None) -> str:
    """Paths relative to ``root``; as URIs under ``uri`` where MLflow can download those."""
    rel = [p.relative_to(root).as_posix() for p in paths]
    if uri is not None and uri.startswith(("runs:/", "mlflow-artifacts:/")):
        rel = [f"{uri.rstrip('/')}/{r}" for r in rel]
    shown = ", ".join(rel[:_MAX_LISTED])
    return shown + (f", ... and {len(rel) - _MAX_LISTED} more" if len(rel) > _MAX_LISTED else "")
