"""MLflow wiring: the tracking store, experiments, the parent run and one child run per stage.

This is the only module outside ``pipelines/stages`` that imports ``mlflow``. The functions
use the process-wide tracking URI; set it with `configure` first.

Tags written here (the pipeline and the compare stage rely on them):

- ``landscapes.kind``: ``pipeline`` on parent runs (``train`` on training runs), ``stage`` on
  stage runs, ``sweep`` on a Hydra sweep's parent run.
- ``landscapes.stage``: the stage's name, on a stage run.
- ``landscapes.stage_key``: the stage key (see `stage_key`), set LAST on a stage run, so a
  FINISHED run carrying it has all its outputs logged.
- ``landscapes.outputs``: the stage's outputs as JSON (also the artifact ``outputs.json``).
- ``landscapes.stage_run.<name>``: on the parent run, the id of the run (new or reused) that
  produced that stage's outputs.
- ``landscapes.host`` and ``landscapes.pid``: the process that owns a RUNNING run (pipeline,
  stage, sweep), so a later attempt can close it when that process is gone.

A store or server that fails (an HTTP server that is down or lost mid-run, a sqlite file that
cannot be created or written) raises `TrackingError`, one line naming ``tracking.uri``, the
cause and the fix, with MLflow's exception as ``__cause__``. Errors of the stage functions
themselves pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePath
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from landscapes.errors import ConfigurationError, LandscapesError, LandscapesWarning

__all__ = [
    "TrackingError",
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
    "http_settings",
    "get_or_create_experiment",
    "stage_key",
    "flatten_params",
    "find_finished_stage",
    "run_stage",
    "start_pipeline_run",
    "start_sweep_run",
    "end_run_quietly",
    "translate_failures",
    "owner_tags",
    "close_stale_runs",
    "log_params",
    "log_metrics",
    "log_metric_history",
    "log_artifact",
    "launched_experiment",
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


class TrackingError(LandscapesError, OSError):
    """The tracking store or server failed: unreachable, lost mid-run, or refusing writes.

    The message names ``tracking.uri``, the cause and what to do; MLflow's exception is the
    ``__cause__``. Finished stages and stored tiles are kept, so re-running resumes.
    """


class ArtifactLocationWarning(LandscapesWarning):
    """An experiment on a tracking server keeps its artifacts on a local path of some machine."""


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
    answers (set MLflow's HTTP retries first, `configure` does, or an HTTP server that is down
    takes MLflow's default of about four minutes to fail).

    Args:
        tracking_uri: An absolute ``sqlite:///`` URI, or any other MLflow tracking URI.

    Raises:
        ConfigurationError: The sqlite path is relative, or its database cannot be created or
            opened there (a read-only or missing folder, a file in the way).
        TrackingError: The tracking server does not answer.
    """
    db = _sqlite_path(tracking_uri)
    if db is None:
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        except Exception as exc:
            failure = _failure(exc)
            if failure is None:
                raise
            raise TrackingError(
                f"tracking.uri={tracking_uri}: the tracking server does not answer ({failure[1]}); "
                "is the server running? Start it (mlflow server --host ... --port ...) or point "
                "tracking.uri (MLFLOW_TRACKING_URI) at a running server or an absolute sqlite:/// path."
            ) from exc
        return
    if not db.is_absolute():
        raise ConfigurationError(
            f"tracking URI {tracking_uri!r} is a relative sqlite path; Hydra runs each job in its "
            "own directory, so every job would get its own database. Use an absolute path "
            f"(sqlite:////abs/path/mlflow.db), e.g. set tracking.uri from paths.root_dir."
        )
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                MlflowClient(tracking_uri).search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except (OSError, MlflowException) as exc:
        if isinstance(exc, MlflowException) and _failure(exc) is None:
            raise
        raise ConfigurationError(
            f"tracking.uri={tracking_uri}: cannot create or open the tracking database {db} "
            f"({_first_line(exc)}); set tracking.uri (MLFLOW_TRACKING_URI) to an absolute sqlite:/// "
            "path in a writable folder (e.g. sqlite:///<paths.root_dir>/mlflow.db) or to an "
            "http(s):// tracking server."
        ) from exc


# MLflow's settings of its HTTP client; read at every request, so setting them here holds for
# the calls that follow. Its defaults (7 retries, backoff factor 2, 120 s per request) make one
# call to a server that is down take about four minutes to fail.
HTTP_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_BACKOFF = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
HTTP_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
_HTTP_SET_HERE: dict[str, set[str]] = {}  # values `configure` has put in os.environ: not the user's


def http_settings(request_timeout: float, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's HTTP retry settings under which one call fails within ``request_timeout`` s.

    One call makes ``1 + retries`` attempts of at most ``timeout`` seconds each (connect or
    wait for an answer), with sleeps of ``backoff * 2**(i-1)`` (+ up to ``jitter``) between
    them (urllib3's rule; no sleep before the first retry). From 20 s on there are 3 retries
    (sleeps 0, 2 and 4 s, so a server restarting within seconds is not lost); below, fewer.
    The per-attempt timeout takes what is left: 5 s for the default 30 s. A refused
    connection fails in about 7 s, a server that accepts but never answers in about 28 s.

    Values already set in ``environ`` by the user are kept, and the others fit around them.

    Args:
        request_timeout: Seconds one MLflow call may take in all (``tracking.request_timeout``).
        environ: The environment to read the user's settings from (default ``os.environ``).

    Returns:
        ``{env var: value}`` for the four ``MLFLOW_HTTP_REQUEST_*`` settings.

    Raises:
        ConfigurationError: ``request_timeout`` is not a positive number.

    >>> http_settings(30.0, environ={})["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    '5'
    """
    budget = float(request_timeout)
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigurationError(
            f"tracking.request_timeout={request_timeout!r}: expected a positive number of seconds "
            "one tracking call may take; set it to e.g. 30."
        )
    env = os.environ if environ is None else environ
    user = {k: env[k] for k in (HTTP_RETRIES, HTTP_BACKOFF, HTTP_JITTER, HTTP_TIMEOUT)
            if k in env and env[k] not in _HTTP_SET_HERE.get(k, ())}
    retries = int(user.get(HTTP_RETRIES, 3 if budget >= 20 else 1 if budget >= 6 else 0))
    backoff = int(user.get(HTTP_BACKOFF, 1))
    jitter = float(user.get(HTTP_JITTER, 0.5))
    sleeps = sum(min(120.0, backoff * 2 ** (i - 1)) for i in range(2, retries + 1)) + retries * jitter
    timeout = user.get(HTTP_TIMEOUT, str(max(1, int((budget - sleeps) // (retries + 1)))))
    return {HTTP_RETRIES: str(retries), HTTP_BACKOFF: str(backoff), HTTP_JITTER: str(jitter),
            HTTP_TIMEOUT: str(timeout)}


def configure(tracking_uri: str, *, request_timeout: float = 30.0) -> str:
    """Set MLflow's HTTP retries, create the store (`ensure_store`), make it the tracking URI.

    Args:
        tracking_uri: The tracking URI, e.g. from `default_tracking_uri`.
        request_timeout: Seconds one call to an HTTP tracking server may take, retries
            included (`http_settings`; ``tracking.request_timeout``). Values the user set in
            the environment (``MLFLOW_HTTP_REQUEST_*``) win.

    Returns:
        ``tracking_uri``.

    Raises:
        ConfigurationError: The sqlite database cannot be created there.
        TrackingError: The tracking server does not answer.
    """
    settings = http_settings(request_timeout)
    for name, value in settings.items():
        if name not in os.environ or os.environ[name] in _HTTP_SET_HERE.get(name, ()):
            os.environ[name] = value
            _HTTP_SET_HERE.setdefault(name, set()).add(value)
    ensure_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    return tracking_uri


def get_or_create_experiment(name: str, *, artifact_root: Path) -> str:
    """Return the id of experiment ``name``, creating it where its artifacts belong.

    With a local store (sqlite), a new experiment keeps artifacts under the absolute
    ``<artifact_root>/<name>/``, so they do not depend on the working directory. With an
    ``http(s)`` tracking server, it is created without an artifact location: the server's
    default (``mlflow-artifacts:/``, proxied), so clients on any machine upload to the server's
    artifact store instead of writing to their own disk.

    Args:
        name: Experiment name.
        artifact_root: Directory for artifacts with a local store (ignored with a server). An
            existing experiment keeps its location.

    Returns:
        The experiment id.

    Raises:
        ConfigurationError: An experiment of that name exists but is deleted.
        TrackingError: The tracking store or server failed.

    Warns:
        ArtifactLocationWarning: On a tracking server, the experiment exists with a local
            (``file:``) artifact location, so artifacts go to this machine's disk.
    """
    uri = mlflow.get_tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    client = MlflowClient()
    with translate_failures(None):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
            location = None if remote else (Path(artifact_root).expanduser().absolute() / safe).as_uri()
            try:
                return client.create_experiment(name, artifact_location=location)
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
    location = experiment.artifact_location or ""
    if remote and (location.startswith("file:") or location.startswith("/")):
        warnings.warn(
            f"tracking.experiment={name!r} on tracking.uri={uri} keeps its artifacts at {location}, "
            "a local path: each client writes them to its own disk, not to the server; set "
            "tracking.experiment to a new name (created with the server's artifact store).",
            ArtifactLocationWarning,
            stacklevel=2,
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
    the numbers in ``outputs.metrics`` as metrics (the stage's own measurements; its
    ``outputs.figures``, which describe the result, are the pipeline run's to log), the files and
    folders in ``outputs.artifacts`` as artifacts (at the artifact root, folders under their own
    name), and sets the stage-key tag last. Either way the parent gets the tag
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
            child run then ends FAILED (if the store can still record it; if not, the next
            attempt closes it).
        TrackingError: The tracking store or server failed (lost, refusing writes); the
            message says where the stored tiles are and to re-run to resume.
    """
    outputs_type = outputs_type or _return_type(fn, name)
    with translate_failures(name, inputs, parent_run_id=parent_run_id):
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
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=name,
            nested=True,
            parent_run_id=parent_run_id,
            tags=stage_tags,
        )
    run_id = run.info.run_id
    try:
        if params:
            with translate_failures(name, inputs, parent_run_id=parent_run_id):
                mlflow.log_params(flatten_params(params))
        outputs = fn(cfg, inputs)
        if not isinstance(outputs, outputs_type):
            raise ConfigurationError(
                f"stage {name!r}: {getattr(fn, '__name__', fn)!r} returned "
                f"{type(outputs).__name__}, expected {outputs_type.__name__}; return the "
                "stage's outputs dataclass."
            )
        payload = json.dumps(_canonical(dataclasses.asdict(outputs), f"{name} outputs"))
        metrics = _numbers(getattr(outputs, "metrics", None), name)
        artifacts = _artifact_paths(getattr(outputs, "artifacts", None), name)
        with translate_failures(name, outputs, inputs, parent_run_id=parent_run_id):
            mlflow.log_text(payload, OUTPUTS_ARTIFACT)
            if len(payload) <= MAX_TAG_VAL_LENGTH:
                mlflow.set_tag(TAG_OUTPUTS, payload)
            if metrics:
                mlflow.log_metrics(metrics)
            for artifact in artifacts:
                if artifact.is_dir():
                    mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
                else:
                    mlflow.log_artifact(str(artifact))
            mlflow.set_tag(TAG_STAGE_KEY, key)
    except BaseException as exc:
        _end_active_run(run_id, exc)
        raise
    with translate_failures(name, outputs, inputs, parent_run_id=parent_run_id):
        mlflow.end_run("FINISHED")
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

    It ends FINISHED, or FAILED when the block raises (KILLED on ``KeyboardInterrupt``). When
    the tracking store cannot record that (a lost server, a full disk), the block's exception
    is raised anyway and the next attempt closes the run. Inside ``mlflow run`` (which sets
    ``MLFLOW_RUN_ID``) MLflow resumes that run instead of creating one.

    Args:
        experiment_id: Experiment of the run.
        run_name: Run name.
        tags: Extra tags.
        parent_run_id: Nest under this run (a sweep's parent), or None for a top-level run.

    Yields:
        The active run (``run.info.run_id``).

    Raises:
        TrackingError: The tracking store or server failed, here or in the block (MLflow's
            exception is the ``__cause__``).
    """
    all_tags = {TAG_KIND: "pipeline", **owner_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    with translate_failures(None):
        close_stale_runs(experiment_id, f"tags.`{TAG_KIND}` = '{all_tags[TAG_KIND]}'")
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            nested=parent_run_id is not None,
            parent_run_id=parent_run_id,
            tags=all_tags,
        )
    run_id = run.info.run_id
    try:
        with translate_failures(None, parent_run_id=run_id):
            yield run
            mlflow.end_run("FINISHED")
    except BaseException as exc:
        _end_active_run(run_id, exc)
        raise
    finally:
        _STORES.pop(run_id, None)


def start_sweep_run(experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of a Hydra sweep (``landscapes.kind=sweep``, owner tags); return its id.

    First closes, as KILLED, this host's RUNNING sweep runs whose process is gone (a sweep
    killed before its end), as `start_pipeline_run` does for pipelines. The run is not made
    the active run: the sweep's jobs nest under it by id.

    Raises:
        TrackingError: The tracking store or server failed.
    """
    with translate_failures(None):
        close_stale_runs(experiment_id, f"tags.`{TAG_KIND}` = 'sweep'")
        all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, TAG_KIND: "sweep", **owner_tags()}
        return MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def end_run_quietly(run_id: str, status: str, error: BaseException | None = None) -> bool:
    """Mark ``run_id`` ended with ``status``; never raises.

    After a `TrackingError` (the server is known lost) it makes one short attempt instead of
    MLflow's retries. Used where a run must be closed on the way out of an error that matters
    more (a Hydra job failing, a stage failing).

    Returns:
        Whether the store recorded it.
    """
    try:
        with _one_short_attempt() if isinstance(error, TrackingError) else nullcontext():
            MlflowClient().set_terminated(run_id, status)
        return True
    except Exception:  # noqa: BLE001 - the store cannot record it; the next attempt closes it
        return False


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


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None, run_id: str | None = None) -> None:
    """Log metrics to the active run (or to ``run_id``), at ``step`` if given."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=run_id)


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


# --- failures of the tracking store --------------------------------------------------------

_STORES: dict[str, Path] = {}  # pipeline run id -> the landscape store its stages wrote (for messages)
_STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                           errno.EIO, errno.EFBIG})
_OBJECT_PREFIX = re.compile(r"^(<[^>]*>|[A-Za-z]+Connection(Pool)?\([^)]*\)): ")


def _failure(exc: BaseException) -> tuple[str, str] | None:
    """``("server" | "store", cause)`` when ``exc`` comes from the tracking store failing, else None.

    Server: an HTTP error of MLflow's client (refused, timed out, reset, 5xx after retries).
    Store: sqlite's OperationalError (disk full, read-only, cannot open), or a file-system error
    (no space, read-only, permissions, I/O) of a local artifact or database write.
    """
    import requests
    import sqlalchemy.exc
    import urllib3.exceptions

    if isinstance(exc, LandscapesError):  # our own code's error (a full disk under a store): not MLflow's
        return None
    chain: list[BaseException] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        chain.append(link)
        link = link.__cause__ or link.__context__
    deepest = chain[-1]
    if any(isinstance(e, requests.RequestException | urllib3.exceptions.HTTPError) for e in chain):
        cause = _first_line(deepest)
        # (urllib3's NewConnectionError, a refused connection, is also one of its TimeoutErrors)
        if isinstance(deepest, TimeoutError) or any(
                isinstance(e, requests.Timeout | urllib3.exceptions.ReadTimeoutError) for e in chain):
            cause = f"no answer within {os.environ.get(HTTP_TIMEOUT, '120')} s: {cause}"
        return "server", cause
    for e in chain:
        if isinstance(e, sqlalchemy.exc.OperationalError | sqlite3.OperationalError):
            return "store", _first_line(getattr(e, "orig", None) or e)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _STORE_ERRNOS:
            return "store", _first_line(e)
    return None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = _OBJECT_PREFIX.sub("", text)
    return text if len(text) <= 300 else text[:297] + "..."


def _existing_store(*holders: Any) -> Path | None:
    """The first ``store`` field of ``holders`` (stage inputs or outputs) that exists on disk."""
    for holder in holders:
        store = getattr(holder, "store", None)
        if isinstance(store, str | PurePath) and Path(store).exists():
            return Path(store)
    return None


@contextmanager
def translate_failures(
    stage: str | None = None, *holders: Any, parent_run_id: str | None = None
) -> Iterator[None]:
    """Turn a failure of the tracking store in the block's MLflow calls into a `TrackingError`.

    The error is one line: ``tracking.uri=<uri>``, what failed (the server lost, or the store
    refusing a write) and its cause, what is kept, and to re-run the same command to resume;
    MLflow's exception is its ``__cause__``. Other exceptions pass through unchanged.

    Args:
        stage: The stage whose calls these are, named in the message.
        holders: The stage's outputs or inputs: their ``store`` (if it exists on disk) is
            named as where the evaluated tiles are kept, and remembered for the pipeline run
            ``parent_run_id``, whose own calls name it too.
        parent_run_id: The pipeline run.
    """
    store = _existing_store(*holders)
    if store is not None and parent_run_id is not None:
        _STORES[parent_run_id] = store
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        kind, cause = failure
        store = store or (_STORES.get(parent_run_id) if parent_run_id else None)
        uri = mlflow.get_tracking_uri()
        where = f" during the {stage!r} stage" if stage else ""
        kept = (f"the evaluated tiles are kept in {store}" if store is not None
                else "finished stages are kept")
        if kind == "server":
            message = (f"tracking.uri={uri}: lost the tracking server{where} ({cause}); {kept}; "
                       "re-run the same command to resume once the server is back.")
        else:
            message = (f"tracking.uri={uri}: the tracking store refused a write{where} ({cause}); "
                       f"{kept}; free space on (or fix permissions of) the store's disk, then re-run "
                       "the same command to resume.")
        raise TrackingError(message) from exc


@contextmanager
def _one_short_attempt() -> Iterator[None]:
    """MLflow's HTTP calls in the block make one attempt of at most 2 s (a server known lost)."""
    saved = {k: os.environ.get(k) for k in (HTTP_RETRIES, HTTP_TIMEOUT)}
    os.environ[HTTP_RETRIES], os.environ[HTTP_TIMEOUT] = "0", "2"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _end_active_run(run_id: str, error: BaseException) -> None:
    """End the active run ``run_id`` after ``error``: FAILED (KILLED on Ctrl-C), never raising.

    After a `TrackingError` one short attempt is made. When the store cannot record it, the
    run stays RUNNING with its owner tags (the next attempt closes it) and ``error`` says so
    in a note.
    """
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    active = mlflow.active_run()
    try:
        with _one_short_attempt() if isinstance(error, TrackingError) else nullcontext():
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status)  # pops it from MLflow's stack before writing
            else:
                MlflowClient().set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - keep the error that matters
        error.add_note(
            f"MLflow run {run_id} could not be marked {status} ({_first_line(exc)}); it stays "
            "RUNNING until the next attempt closes it."
        )


def launched_experiment() -> str | None:
    """Inside ``mlflow run`` (``MLFLOW_RUN_ID`` set), the experiment MLflow opened the run in.

    MLflow Projects create the pipeline's run before our code starts, in the experiment named by
    ``--experiment-name``/``--experiment-id`` (``Default`` without them); the stage runs follow
    it, so that all runs of one ``mlflow run`` share one experiment whatever ``tracking.experiment`` says.
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or None
