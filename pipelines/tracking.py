"""MLflow wiring: the tracking store, experiments, the parent run and one child run per stage.

This is the only module outside ``pipelines/stages`` that imports ``mlflow``. The functions
use the process-wide tracking URI; set it with `configure` first.

Tags written here (the pipeline and the compare stage rely on them):

- ``landscapes.kind``: ``pipeline`` on parent runs (``train`` on training runs), ``stage`` on
  stage runs.
- ``landscapes.stage``: the stage's name, on a stage run.
- ``landscapes.stage_key``: the stage key (see `stage_key`), set LAST on a stage run, so a
  FINISHED run carrying it has all its outputs logged.
- ``landscapes.outputs``: the stage's outputs as JSON (also the artifact ``outputs.json``).
- ``landscapes.stage_run.<name>``: on the parent run, the id of the run (new or reused) that
  produced that stage's outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from landscapes.errors import ConfigurationError

__all__ = [
    "TAG_KIND",
    "TAG_STAGE",
    "TAG_STAGE_KEY",
    "TAG_OUTPUTS",
    "TAG_PARENT_STAGE_PREFIX",
    "OUTPUTS_ARTIFACT",
    "default_tracking_uri",
    "default_artifact_root",
    "ensure_store",
    "configure",
    "get_or_create_experiment",
    "stage_key",
    "flatten_params",
    "find_finished_stage",
    "run_stage",
    "start_pipeline_run",
    "owner_tags",
    "close_stale_runs",
    "log_params",
    "log_metrics",
    "log_metric_history",
    "log_artifact",
]

TAG_KIND = "landscapes.kind"
TAG_STAGE = "landscapes.stage"
TAG_STAGE_KEY = "landscapes.stage_key"
TAG_OUTPUTS = "landscapes.outputs"
TAG_PARENT_STAGE_PREFIX = "landscapes.stage_run."
TAG_HOST = "landscapes.host"
TAG_PID = "landscapes.pid"
TAG_ATTEMPT = "landscapes.attempt_key"
TAG_RESUMES = "landscapes.resumes"
OUTPUTS_ARTIFACT = "outputs.json"

_SQLITE = "sqlite:///"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

OutputsT = TypeVar("OutputsT")


# --- store and experiments -----------------------------------------------------------------


def default_tracking_uri(root: Path) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``.

    Args:
        root: Project root (``paths.root_dir``); made absolute, because Hydra changes the
            working directory of each job.

    Returns:
        A tracking URI; the sqlite path is absolute (``sqlite:////abs/path/mlflow.db``).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"{_SQLITE}{(Path(root).expanduser().absolute() / 'mlflow.db')}"


def default_artifact_root(tracking_uri: str, fallback: Path) -> Path:
    """Where new experiments keep artifacts: ``mlartifacts/`` beside a sqlite database.

    Args:
        tracking_uri: The tracking URI.
        fallback: Used when the URI is not a local sqlite file.

    Returns:
        An absolute directory.
    """
    db = _sqlite_path(tracking_uri)
    if db is not None and db.is_absolute():
        return db.parent / "mlartifacts"
    return Path(fallback).expanduser().absolute()


def ensure_store(tracking_uri: str) -> None:
    """Create the tracking database and its tables now, once, under a file lock.

    Call it in the driver before parallel jobs start: sqlite corrupts when several processes
    create the tables at once. Idempotent; for non-sqlite URIs it only checks the store
    answers.

    Args:
        tracking_uri: An absolute ``sqlite:///`` URI, or any other MLflow tracking URI.

    Raises:
        ConfigurationError: The sqlite path is relative.
    """
    db = _sqlite_path(tracking_uri)
    if db is None:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return
    if not db.is_absolute():
        raise ConfigurationError(
            f"tracking URI {tracking_uri!r} is a relative sqlite path; Hydra runs each job in its "
            "own directory, so every job would get its own database. Use an absolute path "
            f"(sqlite:////abs/path/mlflow.db), e.g. set tracking.uri from paths.root_dir."
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def configure(tracking_uri: str) -> str:
    """Create the store (`ensure_store`) and make it this process's tracking URI.

    Args:
        tracking_uri: The tracking URI, e.g. from `default_tracking_uri`.

    Returns:
        ``tracking_uri``.
    """
    ensure_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    return tracking_uri


def get_or_create_experiment(name: str, *, artifact_root: Path) -> str:
    """Return the id of experiment ``name``, creating it with an absolute artifact location.

    Args:
        name: Experiment name.
        artifact_root: Directory for artifacts; a new experiment stores them under
            ``<artifact_root>/<name>/`` (absolute, so it does not depend on the working
            directory). An existing experiment keeps its location.

    Returns:
        The experiment id.

    Raises:
        ConfigurationError: An experiment of that name exists but is deleted.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
        location = Path(artifact_root).expanduser().absolute() / safe
        try:
            return client.create_experiment(name, artifact_location=location.as_uri())
        except MlflowException as exc:  # created by a concurrent job meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise ConfigurationError(
            f"experiment {name!r} (id {experiment.experiment_id}) is deleted; restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or set "
            "tracking.experiment to another name."
        )
    return experiment.experiment_id


# --- stage keys and parameters -------------------------------------------------------------


def stage_key(
    name: str, stage_cfg: Mapping[str, Any], upstream_keys: Sequence[str], version: str
) -> str:
    """Hash what determines a stage's outputs.

    Args:
        name: Stage name.
        stage_cfg: The stage's resolved config (mapping, dataclass or ``DictConfig``).
        upstream_keys: Keys of the stages whose outputs it reads, in order.
        version: Code version (package version, or a stage-specific one).

    Returns:
        The sha256 hex digest of a canonical JSON of the four (sorted keys, no spaces).

    Raises:
        ConfigurationError: The config holds a value with no canonical JSON form.

    >>> a = stage_key("grid", {"x": 1, "y": [1, 2]}, [], "0.1.0")
    >>> a == stage_key("grid", {"y": [1, 2], "x": 1}, [], "0.1.0"), len(a)
    (True, 64)
    """
    payload = {
        "name": name,
        "config": _canonical(stage_cfg, f"{name} config"),
        "upstream": [str(k) for k in upstream_keys],
        "version": str(version),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def flatten_params(params: Mapping[str, Any], *, sep: str = ".") -> dict[str, str]:
    """Flatten nested mappings and dataclasses to MLflow parameters.

    Args:
        params: Possibly nested parameters.
        sep: Separator of the key path.

    Returns:
        ``{"a.b": "value"}``; sequences become JSON; values longer than MLflow's limit
        (6000 characters) are cut and end with ``...``.

    >>> flatten_params({"grid": {"x": {"num": 41}}, "seeds": [0, 1]})
    {'grid.x.num': '41', 'seeds': '[0,1]'}
    """
    flat: dict[str, str] = {}
    for path, value in _leaves(params, sep):
        if isinstance(value, str | PurePath):
            text = str(value)
        elif isinstance(value, enum.Enum):
            text = str(value.value)
        elif isinstance(value, Sequence):
            text = json.dumps(_canonical(value, path), separators=(",", ":"))
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        flat[path] = text
    return flat


def _leaves(value: Any, sep: str = ".", prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every leaf of nested mappings and dataclasses."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, sep, f"{prefix}{sep}{k}" if prefix else str(k))
    else:
        yield prefix, value


# --- runs ----------------------------------------------------------------------------------


def find_finished_stage(experiment_id: str, key: str) -> Run | None:
    """The newest FINISHED run in ``experiment_id`` tagged ``landscapes.stage_key = key``.

    Args:
        experiment_id: Experiment to search.
        key: A stage key from `stage_key`.

    Returns:
        The run, or None.
    """
    if not _KEY_PATTERN.fullmatch(key):
        raise ConfigurationError(f"stage key {key!r} must be a hex digest from stage_key().")
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_STAGE_KEY}` = '{key}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def run_stage(
    name: str,
    fn: Callable[[Any, Any], OutputsT],
    cfg: Any,
    inputs: Any,
    *,
    parent_run_id: str | None,
    experiment_id: str,
    key: str,
    params: Mapping[str, Any] | None = None,
    outputs_type: type[OutputsT] | None = None,
    reuse: bool = True,
    check: Callable[[OutputsT], str | None] | None = None,
) -> OutputsT:
    """Run one pipeline stage as a child run, or reuse a finished run with the same key.

    Reuse needs a FINISHED run tagged with ``key`` whose outputs rebuild as ``outputs_type``
    and whose ``Path`` fields all still exist. Otherwise a nested run named ``name`` is
    opened under ``parent_run_id``; it logs ``params`` (flattened), calls ``fn(cfg, inputs)``,
    logs the outputs as JSON (tag ``landscapes.outputs`` and artifact ``outputs.json``),
    the numbers in ``outputs.metrics`` as metrics, the files and folders in
    ``outputs.artifacts`` as artifacts (at the artifact root, folders under their own name),
    and sets the stage-key tag last. Either way the parent gets the tag
    ``landscapes.stage_run.<name> = <run id>``.

    Args:
        name: Stage name (the child run's name).
        fn: The stage function; returns a frozen dataclass of paths, URIs and numbers.
        cfg: The stage's config, passed to ``fn``.
        inputs: The stage's inputs, passed to ``fn``.
        parent_run_id: The pipeline's parent run; it must be the active run if there is one.
        experiment_id: Experiment of the runs.
        key: The stage key (`stage_key`).
        params: What to log as parameters (usually the stage's config).
        outputs_type: The dataclass ``fn`` returns; defaults to its return annotation.
        reuse: Look for a finished run first.
        check: Says why a finished run's outputs cannot be reused (damaged, changed, in
            another project root), or None when they can; checked before reuse, cheaply.

    Returns:
        The outputs, from ``fn`` or rebuilt from the reused run.

    Raises:
        ConfigurationError: ``fn`` returned something other than an ``outputs_type``, or
            listed an artifact that does not exist. Exceptions from ``fn`` propagate; the
            child run then ends FAILED.
    """
    outputs_type = outputs_type or _return_type(fn, name)
    if reuse:
        previous = find_finished_stage(experiment_id, key)
        if previous is not None:
            outputs = _read_outputs(previous, outputs_type)
            if outputs is not None and _local_paths_exist(outputs):
                why = check(outputs) if check is not None else None
                if why is None:
                    _link_parent(parent_run_id, name, previous.info.run_id)
                    return outputs
                print(f"{name}: not reusing run {previous.info.run_id}: {why}; running the stage again.",
                      file=sys.stderr, flush=True)
    stale = close_stale_runs(experiment_id, f"tags.`{TAG_ATTEMPT}` = '{key}'")
    stage_tags = {TAG_KIND: "stage", TAG_STAGE: name, TAG_ATTEMPT: key, **owner_tags()}
    if stale:
        stage_tags[TAG_RESUMES] = ",".join(stale)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        nested=True,
        parent_run_id=parent_run_id,
        tags=stage_tags,
    ) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        outputs = fn(cfg, inputs)
        if not isinstance(outputs, outputs_type):
            raise ConfigurationError(
                f"stage {name!r}: {getattr(fn, '__name__', fn)!r} returned "
                f"{type(outputs).__name__}, expected {outputs_type.__name__}; return the "
                "stage's outputs dataclass."
            )
        payload = json.dumps(_canonical(dataclasses.asdict(outputs), f"{name} outputs"))
        mlflow.log_text(payload, OUTPUTS_ARTIFACT)
        if len(payload) <= MAX_TAG_VAL_LENGTH:
            mlflow.set_tag(TAG_OUTPUTS, payload)
        metrics = _numbers(getattr(outputs, "metrics", None), name)
        if metrics:
            mlflow.log_metrics(metrics)
        for artifact in _artifact_paths(getattr(outputs, "artifacts", None), name):
            if artifact.is_dir():
                mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
            else:
                mlflow.log_artifact(str(artifact))
        mlflow.set_tag(TAG_STAGE_KEY, key)
        run_id = run.info.run_id
    _link_parent(parent_run_id, name, run_id)
    return outputs


@contextmanager
def start_pipeline_run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    *,
    parent_run_id: str | None = None,
) -> Iterator[Run]:
    """Open the parent run of a pipeline (``landscapes.kind=pipeline`` unless ``tags`` says).

    It ends FINISHED, or FAILED when the block raises. Inside ``mlflow run`` (which sets
    ``MLFLOW_RUN_ID``) MLflow resumes that run instead of creating one.

    Args:
        experiment_id: Experiment of the run.
        run_name: Run name.
        tags: Extra tags.
        parent_run_id: Nest under this run (a sweep's parent), or None for a top-level run.

    Yields:
        The active run (``run.info.run_id``).
    """
    all_tags = {TAG_KIND: "pipeline", **owner_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    close_stale_runs(experiment_id, f"tags.`{TAG_KIND}` = '{all_tags[TAG_KIND]}'")
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags=all_tags,
    ) as run:
        yield run


def owner_tags() -> dict[str, str]:
    """Which process owns a run: lets a later run close it if that process was killed."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}


def close_stale_runs(experiment_id: str, filter_string: str) -> list[str]:
    """End as KILLED the RUNNING runs matching ``filter_string`` whose process on this host is gone.

    A run killed with SIGKILL never ends itself; the next attempt of the same stage (or
    pipeline) closes it. Runs of other hosts, of live processes, or without owner tags stay.

    Returns:
        The ids of the runs it closed.
    """
    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and {filter_string}")
    host, closed = socket.gethostname(), []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(TAG_PID, "")
        if tags.get(TAG_HOST) != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
        except PermissionError:  # alive, owned by someone else
            continue
    return closed


def log_params(params: Mapping[str, Any]) -> None:
    """Log flattened parameters (`flatten_params`) to the active run."""
    mlflow.log_params(flatten_params(params))


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log metrics to the active run, at ``step`` if given."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_metric_history(history: Sequence[Mapping[str, float]]) -> None:
    """Log ``history[step]`` as the metrics at ``step`` to the active run, in one batch."""
    run = mlflow.active_run()
    if run is None:
        raise ConfigurationError("log_metric_history: no active run; call it inside a run.")
    now = int(time.time() * 1000)
    metrics = [
        Metric(key=k, value=float(v), timestamp=now, step=step)
        for step, row in enumerate(history)
        for k, v in row.items()
    ]
    MlflowClient().log_batch(run.info.run_id, metrics=metrics)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's contents, under ``artifact_path`` of the active run."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


# --- helpers -------------------------------------------------------------------------------


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith(_SQLITE):
        return None
    return Path(tracking_uri[len(_SQLITE) :].split("?", 1)[0])


def _canonical(value: Any, where: str) -> Any:
    """A JSON-ready copy with mappings as dicts, paths as strings, enums as values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _canonical(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Sequence):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        return sorted(_canonical(v, where) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _canonical(value.item(), where)
    raise ConfigurationError(
        f"{where}: value {value!r} of type {type(value).__name__} has no JSON form; use "
        "numbers, strings, paths, enums, lists, mappings or dataclasses of those."
    )


def _return_type(fn: Callable[..., Any], name: str) -> type[Any]:
    hint = typing.get_type_hints(fn).get("return")
    if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        raise ConfigurationError(
            f"stage {name!r}: pass outputs_type=, or annotate {getattr(fn, '__name__', fn)!r} "
            "with its outputs dataclass as return type."
        )
    return hint


def _read_outputs(run: Run, outputs_type: type[OutputsT]) -> OutputsT | None:
    text = run.data.tags.get(TAG_OUTPUTS)
    try:
        if text is None:
            text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{OUTPUTS_ARTIFACT}")
        return _rebuild(outputs_type, json.loads(text))
    except (MlflowException, OSError, ValueError, TypeError, KeyError):
        return None  # unreadable or from an older schema: run the stage again


def _rebuild(tp: Any, value: Any) -> Any:
    """Rebuild a value of type ``tp`` from its JSON form (dataclasses, paths, containers)."""
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _rebuild(options[0], value) if len(options) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: _rebuild(hints.get(k, Any), v) for k, v in value.items() if k in fields})
    if isinstance(tp, type) and issubclass(tp, PurePath | enum.Enum):
        return tp(value)
    if origin in (tuple, list, Sequence) and isinstance(value, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(_rebuild(a, v) for a, v in zip(args, value, strict=True))
        items = [_rebuild(args[0] if args else Any, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) and isinstance(value, dict):
        args = typing.get_args(tp)
        item = args[1] if len(args) == 2 else Any
        return {k: _rebuild(item, v) for k, v in value.items()}
    if tp is float and isinstance(value, int | str):
        return float(value)
    return value


def _local_paths_exist(value: Any) -> bool:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_local_paths_exist(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, PurePath):
        return Path(value).exists()
    if isinstance(value, Mapping):
        return all(_local_paths_exist(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_local_paths_exist(v) for v in value)
    return True


def _numbers(metrics: Any, name: str) -> dict[str, float]:
    """Flatten ``outputs.metrics`` (dataclass or mapping, possibly nested) to floats."""
    if metrics is None:
        return {}
    if not (isinstance(metrics, Mapping) or dataclasses.is_dataclass(metrics)):
        raise ConfigurationError(
            f"stage {name!r}: outputs.metrics is a {type(metrics).__name__}; make it a "
            "dataclass or mapping of numbers."
        )
    out: dict[str, float] = {}
    for path, value in _leaves(metrics):
        if value is None:
            continue
        try:
            out[path] = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"stage {name!r}: outputs.metrics.{path} = {value!r} is not a number; "
                "make outputs.metrics a dataclass or mapping of numbers."
            ) from exc
    return out


def _artifact_paths(artifacts: Any, name: str) -> list[Path]:
    if artifacts is None:
        return []
    if isinstance(artifacts, str | PurePath):
        artifacts = [artifacts]
    elif isinstance(artifacts, Mapping):
        artifacts = list(artifacts.values())
    paths = []
    for item in artifacts:
        text = str(item)
        path = Path(text[len("file://") :] if text.startswith("file://") else text)
        if not path.exists():
            raise ConfigurationError(
                f"stage {name!r}: outputs.artifacts lists {text!r}, which does not exist; "
                "list only local files or folders the stage wrote."
            )
        paths.append(path)
    return paths


def _link_parent(parent_run_id: str | None, name: str, run_id: str) -> None:
    if parent_run_id:
        MlflowClient().set_tag(parent_run_id, f"{TAG_PARENT_STAGE_PREFIX}{name}", run_id)
