"""Who evaluates the tiles: in this process (``local``), or on dask workers (``dask``).

Both backends follow the same contract (:class:`Backend`): evaluate the given tiles, write each
to the landscape's Zarr store as whole chunks, and record it in the store's ``done`` mask as
soon as it is written, so that a run stopped at any moment resumes from the finished tiles.
Only the driver (this process) writes the ``done`` mask; workers write metric chunks only.

The dask backend (``compute.backend=dask``):

- starts a ``distributed.LocalCluster`` of ``compute.workers`` processes with
  ``compute.threads_per_worker`` threads each (a ``dask_cuda.LocalCUDACluster``, one worker
  per GPU, when ``compute.device`` is CUDA and ``dask_cuda`` is installed), or connects to an
  existing scheduler at ``compute.scheduler``; it closes only the cluster it started;
- ships the prepared :class:`~landscapes.evaluate.Evaluator` once per worker in a
  ``WorkerPlugin`` (a replaced worker gets it again when it joins), and sets
  ``torch.set_num_threads(threads_per_worker)`` there (dask sets ``OMP_NUM_THREADS=1``);
  a worker evaluates one tile at a time with that many torch threads;
- submits one task per tile with a deterministic key ``tile-<fingerprint[:8]>-<layout>-<i>-<j>``
  and ``retries=2``; a worker process that dies is restarted by its nanny and its tile is run
  again elsewhere;
- marks tiles done as they complete (``as_completed``) and updates one progress bar for the
  whole grid; tiles that still fail are collected, the others finish, and then one
  :class:`~landscapes.errors.EvaluationError` lists the failed tiles and says how to resume;
- watches the cluster while tiles are pending (every :data:`POLL_SECONDS`): a cluster without
  workers for ``compute.no_workers_timeout`` seconds, or a lost scheduler (its connection closed,
  or no answer for that long), stops the run at once with one message naming the scheduler,
  the cause, the tiles kept and how to resume, instead of waiting for ever or listing every
  pending tile as "cancelled".

What stops a run early, in both backends, keeping every tile finished before it (marked done):

- :class:`~landscapes.errors.StoreWriteError` (disk full, quota, permissions) passes through
  unwrapped: its message already names the store, the errno and "re-run to resume";
- :class:`~landscapes.errors.ConfigurationError` and
  :class:`~landscapes.errors.ShapeMismatchError` from the evaluator pass through unwrapped;
- an error that is most likely the data's or the configuration's (an ``IndexError`` from a
  metric, as labels outside the model's classes give; a tile that fails with the same error on
  every try before any tile of the run finished) becomes an ``EvaluationError`` that says so:
  re-running as is would fail the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, Protocol

from landscapes.errors import (
    ConfigurationError,
    EvaluationError,
    ShapeMismatchError,
    StoreWriteError,
)
from landscapes.evaluate import Evaluator
from landscapes.grid import Tile
from landscapes.store import LandscapeStore
from pipelines.config import ComputeConfig

__all__ = ["Backend", "LocalBackend", "DaskBackend", "make_backend", "EvaluatorPlugin"]

log = logging.getLogger(__name__)

#: Seconds to wait for an existing scheduler (and for its first worker) before giving up.
CONNECT_TIMEOUT = 10.0
#: How many times dask re-runs a tile whose task raised, before it counts as failed.
TILE_RETRIES = 2
#: Seconds a dask cluster may have no workers (``compute.no_workers_timeout``) before the run fails.
NO_WORKERS_TIMEOUT = 60.0
#: Seconds between two looks at the dask cluster (its workers, its scheduler) while tiles are pending.
POLL_SECONDS = 1.0
#: Errors that say the configuration is wrong: every tile would fail the same way.
_CONFIG_ERRORS = (ConfigurationError, ShapeMismatchError)
#: Errors raised as they are, by both backends, after the finished tiles are marked done.
_PASS_THROUGH = (*_CONFIG_ERRORS, StoreWriteError)
#: Failures at the first tiles, all alike, after which the dask backend stops (see `_same_failures`).
_ALIKE_FAILURES = 3


class Backend(Protocol):
    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        """Evaluate ``tiles``, write them to ``store``, mark them done; return the seconds spent."""


# --- local -----------------------------------------------------------------------------------


class LocalBackend:
    """Tiles one after another in this process; each tile is written and marked done at once.

    The first failing tile stops the run (the error would most likely repeat on every tile);
    the tiles finished before it stay in the store, and re-running resumes after them. The
    first tile of a run gets a second try: if it fails again with the same error, the message
    says that the data or the configuration, not a passing fault, is the likely cause.
    """

    name = "local"

    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        started = time.perf_counter()
        bar = _bar(store, tiles, progress)
        done = 0
        try:
            with evaluator.hold_memory():  # freed activations reused across tiles
                for tile in tiles:
                    errors: list[BaseException] = []
                    while True:
                        try:
                            values = evaluator.evaluate_tile(store.grid, tile)
                            store.write_tile(tile, values)
                        except _PASS_THROUGH:
                            raise
                        except Exception as err:
                            errors.append(err)
                            if done == 0 and len(errors) == 1 and not _looks_like_config(err):
                                continue  # the first tile: a passing fault, or the same error again?
                            raise EvaluationError(_local_failure(store, tile, errors, done, len(tiles))) from err
                        break
                    store.mark_done([tile])
                    done += 1
                    bar.update(tile.size)
        finally:
            bar.close()
        return time.perf_counter() - started


def _local_failure(store: LandscapeStore, tile: Tile, errors: list[BaseException], done: int, todo: int) -> str:
    err = errors[-1]
    if _looks_like_config(err):
        return _config_message(store, tile, err, "")
    if len(errors) > 1 and _describe(errors[0]) == _describe(err):
        return _same_error_message(store, [tile], err, "twice")
    return (
        f"evaluate: tile {tile.index} ({_span(tile)}) failed: {_describe(err)}. "
        f"{done} tile(s) of this run are kept in {store.path}; fix the cause and "
        f"re-run the same command to resume ({todo - done} tile(s) left)."
    )


def _looks_like_config(err: BaseException) -> bool:
    """An error that every tile would raise: labels outside the model's classes (``IndexError``
    on CPU, "device-side assert" or "out of bounds" on CUDA), a wrong option."""
    if isinstance(err, (*_CONFIG_ERRORS, IndexError)):
        return True
    text = str(err)
    if type(err) is Exception and text.startswith("IndexError("):  # dask could not unpickle it
        return True
    return isinstance(err, RuntimeError) and any(s in text for s in ("device-side assert", "out of bounds"))


def _kept(store: LandscapeStore) -> str:
    """``"<done> of <tiles> tile(s) done are kept in <store>"`` (the done mask read again)."""
    try:
        done = f"{int(store.done_mask().sum())} of {len(store.tiles())}"
    except Exception:  # noqa: BLE001 - a message must not fail: say less
        done = "the finished"
    return f"{done} tile(s) done are kept in {store.path}"


def _config_message(store: LandscapeStore, tile: Tile, err: BaseException, where: str) -> str:
    return (
        f"evaluate: tile {tile.index} ({_span(tile)}) failed{where}: {_describe(err).rstrip('.')}. This is most likely "
        "a problem of the data or the metrics (e.g. labels outside the model's output classes), not a passing "
        "fault, so re-running will fail the same way: check data.* and metrics.* against the model; "
        f"{_kept(store)} (a re-run with the same data and metrics reuses them)."
    )


def _same_error_message(store: LandscapeStore, tiles: Sequence[Tile], err: BaseException, how: str) -> str:
    which = f"tile {tiles[0].index} ({_span(tiles[0])})" if len(tiles) == 1 else (
        f"the first {len(tiles)} tiles ({', '.join(str(t.index) for t in tiles)})")
    return (
        f"evaluate: {which} failed {how} with the same error, before any tile of this run finished: "
        f"{_describe(err).rstrip('.')}. This is most likely a problem of the data, the model or the metrics (or of the "
        "workers' set-up), not a passing fault, so re-running as is will fail the same way: fix the cause "
        f"first; {_kept(store)} (a re-run with the same data and metrics reuses them)."
    )


# --- dask ------------------------------------------------------------------------------------


class EvaluatorPlugin:
    """A ``distributed.WorkerPlugin`` that holds one prepared evaluator per worker process.

    The scheduler keeps the plugin and hands it to every worker that joins, replacements of
    dead workers included, so each worker unpickles the evaluator once, not once per tile.
    """

    idempotent = False

    def __init__(self, evaluator: Evaluator, threads: int):
        self.evaluator = evaluator
        self.threads = int(threads)
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        _set_torch_threads(self.threads)

    def teardown(self, worker: Any) -> None:
        self.evaluator = None


def _plugin_class() -> type:
    """``EvaluatorPlugin`` as a real ``WorkerPlugin`` subclass (distributed imported lazily)."""
    global _PLUGIN_CLASS
    if _PLUGIN_CLASS is None:
        from distributed.diagnostics.plugin import WorkerPlugin

        _PLUGIN_CLASS = type("DaskEvaluatorPlugin", (EvaluatorPlugin, WorkerPlugin), {"__module__": __name__})
        globals()["DaskEvaluatorPlugin"] = _PLUGIN_CLASS  # picklable by reference
    return _PLUGIN_CLASS


_PLUGIN_CLASS: type | None = None
_STORES: dict[tuple, LandscapeStore] = {}
_STORES_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:  # workers unpickle DaskEvaluatorPlugin by name
    if name == "DaskEvaluatorPlugin":
        return _plugin_class()
    raise AttributeError(name)


def evaluate_and_write_tile(plugin_name: str, store_path: str, layout: tuple, tile: Tile) -> dict[str, Any]:
    """The task of one tile on a dask worker: evaluate it and write its chunks to the store.

    Args:
        plugin_name: the worker plugin that holds the prepared evaluator.
        store_path: the landscape store (opened once per worker and layout).
        layout: ``(shape, tile_shape, metrics)`` of the store, so a store recreated at the
            same path is never written with a stale layout.
        tile: the tile (one chunk of every metric array).

    Returns:
        ``{"tile", "points", "seconds", "worker"}`` for the driver's bookkeeping.
    """
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None or getattr(plugin, "evaluator", None) is None:
        raise EvaluationError(
            f"evaluate: worker {worker.address} has no evaluator {plugin_name!r}; the worker plugin "
            "was not installed (was it unregistered by another client?). Re-run to resume."
        )
    started = time.perf_counter()
    with plugin.lock:  # one tile at a time per worker: the evaluator moves its model's weights
        _set_torch_threads(plugin.threads)
        store = _worker_store(store_path, layout)
        values = plugin.evaluator.evaluate_tile(store.grid, tile)
        store.write_tile(tile, values)
    return {"tile": tile.index, "points": tile.size, "seconds": time.perf_counter() - started, "worker": worker.address}


def _worker_store(path: str, layout: tuple) -> LandscapeStore:
    key = (path, layout)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = LandscapeStore.open(path, mode="r+")
            found = (tuple(store.shape), tuple(store.tile_shape), tuple(store.metrics))
            if found != layout:
                raise EvaluationError(
                    f"evaluate: the store {path} on this worker has shape/tile shape/metrics {found}, "
                    f"the driver expects {layout}; is the path shared by driver and workers?"
                )
            _STORES.clear()  # one store at a time is enough; do not keep old ones open
            _STORES[key] = store
        return store


def _set_torch_threads(threads: int) -> None:
    import torch

    if threads >= 1 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class DaskBackend:
    """Tiles as dask tasks; workers evaluate and write, the driver marks done and reports.

    Args:
        workers: worker processes of the local cluster (``compute.workers``).
        threads_per_worker: torch threads of each worker (``compute.threads_per_worker``).
        scheduler: address of an existing scheduler (``compute.scheduler``), e.g.
            ``tcp://host:8786``; None starts a local cluster for the run and closes it after.
        device: ``"cpu"`` or ``"cuda"``; CUDA uses ``dask_cuda.LocalCUDACluster`` if installed.
        connect_timeout: seconds to wait for ``scheduler`` and for its first worker.
        no_workers_timeout: seconds the cluster may have no workers while tiles are pending
            (``compute.no_workers_timeout``), and the longest the scheduler may leave a status
            request unanswered, before the run stops with the finished tiles kept.
        cluster_kwargs: extra keyword arguments of the local cluster.

    Raises:
        ConfigurationError: non-positive ``workers``, ``threads_per_worker`` or ``no_workers_timeout``.
    """

    name = "dask"

    def __init__(
        self,
        *,
        workers: int = 2,
        threads_per_worker: int = 1,
        scheduler: str | None = None,
        device: str = "cpu",
        connect_timeout: float = CONNECT_TIMEOUT,
        no_workers_timeout: float = NO_WORKERS_TIMEOUT,
        cluster_kwargs: Mapping[str, Any] | None = None,
    ):
        for key, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"compute.{key}={value!r}: expected a positive integer; set compute.{key}=1 or more.")
        if isinstance(no_workers_timeout, bool) or not isinstance(no_workers_timeout, (int, float)) or not no_workers_timeout > 0:
            raise ConfigurationError(
                f"compute.no_workers_timeout={no_workers_timeout!r}: expected a positive number of seconds; set "
                f"compute.no_workers_timeout={NO_WORKERS_TIMEOUT:g} (or more, for a cluster that adds workers slowly)."
            )
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.scheduler = scheduler or None
        self.device = str(device)
        self.connect_timeout = float(connect_timeout)
        self.no_workers_timeout = float(no_workers_timeout)
        self.cluster_kwargs = dict(cluster_kwargs or {})
        self.last_run: dict[str, Any] = {}

    # -- connection --------------------------------------------------------------------------
    def connect(self) -> tuple[Any, Any]:
        """``(client, cluster)``: ``cluster`` is the one started here (None for a user's scheduler)."""
        from distributed import Client

        if self.scheduler is not None:
            return self._connect_existing(Client), None
        cluster = self._local_cluster()
        try:
            client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return client, cluster

    def _connect_existing(self, Client: type) -> Any:
        fix = (
            f"start one there (`dask scheduler` on the host, then `dask worker {self.scheduler}` on each "
            "machine), correct the address (e.g. compute.scheduler=tcp://host:8786), or set "
            "compute.scheduler=null to start a local cluster of compute.workers processes"
        )
        self._probe(fix)
        try:
            client = Client(self.scheduler, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as err:
            raise ConfigurationError(
                f"compute.scheduler={self.scheduler!r}: no dask scheduler answered within "
                f"{self.connect_timeout:g} s ({_describe(err)}); {fix}."
            ) from err
        try:
            client.wait_for_workers(1, timeout=self.connect_timeout)
        except (TimeoutError, OSError) as err:
            client.close()
            raise ConfigurationError(
                f"compute.scheduler={self.scheduler!r}: the scheduler has no workers after "
                f"{self.connect_timeout:g} s; start workers with `dask worker {self.scheduler}` "
                "(in an environment where `landscapes` and the model's code are installed)."
            ) from err
        return client

    def _probe(self, fix: str) -> None:
        """Fail fast, before a Client exists: a malformed address, or no TCP listener there."""
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port

        try:
            scheme, location = parse_address(str(self.scheduler))
            host, port = parse_host_port(location) if scheme in ("tcp", "tls") else (None, None)
        except (ValueError, TypeError) as err:
            raise ConfigurationError(
                f"compute.scheduler={self.scheduler!r} is not a dask scheduler address ({_describe(err)}); "
                "give it as tcp://host:8786, or set compute.scheduler=null to start a local cluster."
            ) from err
        if host is None:
            return  # another transport (ucx://, inproc://): let the Client try it
        try:
            socket.create_connection((host, port), timeout=self.connect_timeout).close()
        except OSError as err:
            raise ConfigurationError(
                f"compute.scheduler={self.scheduler!r}: no dask scheduler answered within "
                f"{self.connect_timeout:g} s ({_describe(err)}); {fix}."
            ) from err

    def _local_cluster(self) -> Any:
        kwargs: dict[str, Any] = {
            "threads_per_worker": self.threads_per_worker,
            "dashboard_address": ":0",  # any free port: parallel jobs each start a cluster
            "env": {"DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "warning")},
        }
        if self.device.startswith("cuda"):
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                log.warning(
                    "compute.device=cuda with compute.backend=dask: dask_cuda is not installed, so all "
                    "%d workers share the default GPU; `pip install dask-cuda` for one worker per GPU.",
                    self.workers,
                )
            else:
                import torch

                kwargs["n_workers"] = max(1, min(self.workers, torch.cuda.device_count()))
                return LocalCUDACluster(**(kwargs | self.cluster_kwargs))
        from distributed import LocalCluster

        kwargs.update(n_workers=self.workers, processes=True)
        return LocalCluster(**(kwargs | self.cluster_kwargs))

    # -- the run -----------------------------------------------------------------------------
    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        """Evaluate ``tiles`` on the cluster; see the module docstring for the guarantees.

        Raises:
            ConfigurationError: the scheduler cannot be reached, or its workers cannot load
                the evaluator (``landscapes`` or the model's code missing there); or a tile
                raised one (as do ``ShapeMismatchError`` and ``StoreWriteError``: unwrapped).
            EvaluationError: some tiles failed after their retries (the others are done); or
                the run stopped early: no workers for ``no_workers_timeout`` seconds, the
                scheduler lost, an error most likely the data's, the first tiles failing alike.
        """
        started = time.perf_counter()
        tiles = list(tiles)
        if not tiles:
            return 0.0
        with _quiet_distributed():
            return self._run(evaluator, store, tiles, progress=progress, started=started)

    def _run(self, evaluator: Evaluator, store: LandscapeStore, tiles: list[Tile], *, progress: bool, started: float) -> float:
        client, cluster = self.connect()
        token = _layout_token(store)
        plugin_name = f"landscapes-evaluator-{token}"
        run = _DaskRun(self, client, store, tiles)
        timings = {"start_seconds": 0.0, "compute_seconds": 0.0}
        try:
            self._install(client, evaluator, plugin_name)
            timings["start_seconds"] = time.perf_counter() - started
            run.bar = _bar(store, tiles, progress)  # from here on: points/s and ETA of the tiles alone
            layout = (tuple(store.shape), tuple(store.tile_shape), tuple(store.metrics))
            keys = [f"tile-{token}-{'-'.join(str(i) for i in t.index)}" for t in tiles]
            futures = client.map(
                evaluate_and_write_tile, [plugin_name] * len(tiles), [str(store.path)] * len(tiles),
                [layout] * len(tiles), tiles, key=keys, retries=TILE_RETRIES,
            )
            run.collect(futures)
            del futures
            timings["compute_seconds"] = time.perf_counter() - started - timings["start_seconds"]
        finally:
            if run.bar is not None:
                run.bar.close()
            workers = 0 if run.scheduler_lost else _n_workers(client)
            self.last_run = {"tiles_done": run.done, "tiles_failed": len(run.failed), "workers": workers}
            closing = time.perf_counter()
            self._close(client, cluster, plugin_name, reachable=not run.scheduler_lost)
            self.last_run |= timings | {"close_seconds": time.perf_counter() - closing}
        if run.failed:
            raise EvaluationError(_failure_message(store, tiles, run.failed))
        return time.perf_counter() - started

    def where(self, client: Any = None) -> str:
        """The cluster, as messages name it: the config key, or the local cluster's address."""
        if self.scheduler:
            return f"compute.scheduler={self.scheduler!r}"
        address = _scheduler_address(client)
        return f"the local dask cluster ({address})" if address else "the local dask cluster"

    def _install(self, client: Any, evaluator: Evaluator, name: str) -> None:
        plugin = _plugin_class()(evaluator, self.threads_per_worker)
        try:
            client.register_plugin(plugin, name=name)
        except Exception as err:
            where = f"compute.scheduler={self.scheduler!r}" if self.scheduler else "the local dask cluster"
            raise ConfigurationError(
                f"evaluate: the workers of {where} cannot load the evaluator ({_describe(err)}); install "
                "`landscapes` and the model's code in the workers' environment (pip install -e .) and "
                "make the checkpoint's model class importable there."
            ) from err

    @staticmethod
    def _close(client: Any, cluster: Any, plugin_name: str, *, reachable: bool = True) -> None:
        try:
            if cluster is None and reachable and client.status == "running":  # a user's scheduler lives on
                client.unregister_worker_plugin(plugin_name)
        except Exception as err:  # noqa: BLE001 - best effort; the plugin is only memory
            log.debug("could not unregister %s: %s", plugin_name, err)
        finally:
            try:
                with _silenced("distributed.client", not reachable or client.status != "running"):
                    client.close()  # a client reconnecting to a lost scheduler would log "failed to reconnect"
            finally:
                if cluster is not None:
                    cluster.close()


class _DaskRun:
    """One run's bookkeeping on dask: collects the futures, marks tiles done, watches the cluster.

    ``collect`` returns when every tile has finished or failed (failures gathered in ``failed``),
    and raises at once, after marking the finished tiles done, when the run cannot go on: a
    ``StoreWriteError`` or a configuration error from a tile, the first tiles all failing alike,
    no workers for ``no_workers_timeout`` seconds, or a lost scheduler.
    """

    def __init__(self, backend: DaskBackend, client: Any, store: LandscapeStore, tiles: Sequence[Tile]):
        self.backend, self.client, self.store, self.tiles = backend, client, store, tiles
        self.pending: dict[Any, Tile] = {}
        self.failed: list[tuple[Tile, BaseException]] = []
        self.done = 0
        self.bar: Any = None
        self.next_look = 0.0
        self.no_workers_since: float | None = None
        self.scheduler_lost = False  # then nothing more is asked of it: it would not answer

    def collect(self, futures: Sequence[Any]) -> None:
        from distributed import as_completed

        self.pending = dict(zip(futures, self.tiles, strict=True))
        completed = as_completed(list(self.pending), loop=self.client.loop)
        while not completed.is_empty():
            batch = completed.next_batch(block=False)  # what finished meanwhile
            if batch:
                self._take(batch)
            else:
                time.sleep(0.05)
            self._watch()

    def _take(self, batch: list[Any]) -> None:
        finished, lost_scheduler, stop = [], False, None
        for future in batch:
            tile = self.pending.pop(future)
            if future.status in ("finished", "lost"):  # lost: its result (not the tile) went with a worker
                finished.append(tile)
            else:
                err = _exception_of(future)
                if getattr(err, "reason", None) == "scheduler-connection-lost":
                    lost_scheduler = True
                    continue
                self.failed.append((tile, err))
                self.bar.set_postfix_str(f"{len(self.failed)} tile(s) failed", refresh=False)
                if stop is None and (isinstance(err, StoreWriteError) or _looks_like_config(err)):
                    stop = (tile, err)
            future.release()
        self._mark(finished)
        if lost_scheduler or self.client.status != "running":
            self._lost(None)
        if stop is not None:
            tile, err = stop
            if isinstance(err, _PASS_THROUGH):
                self._stop()
                raise err  # its own message names the store or the option, and the fix
            self._fail(_config_message, self.store, tile, err, f" on dask after {TILE_RETRIES} retries")
        alike = _same_failures(self.failed, self.done, len(self.tiles))
        if alike:
            how = f"on every try ({TILE_RETRIES + 1} each)"
            self._fail(_same_error_message, self.store, alike, self.failed[-1][1], how)

    def _mark(self, finished: list[Tile]) -> None:
        self.store.mark_done(finished)  # the driver alone writes the done mask, once per batch
        self.done += len(finished)
        self.bar.update(sum(t.size for t in finished))

    def _watch(self) -> None:
        """Every ``POLL_SECONDS``: is the scheduler there, and has it any workers?"""
        if self.client.status != "running":
            self._lost(None)
        now = time.monotonic()
        if now < self.next_look:
            return
        self.next_look = now + POLL_SECONDS
        timeout = self.backend.no_workers_timeout
        try:
            workers = len(self.client.nthreads(callback_timeout=timeout))
        except TimeoutError as err:
            self._lost(err, f"TimeoutError: it answered no status request for {timeout:g} s")
        except OSError as err:  # CommClosedError is one
            self._lost(err)
        except Exception as err:  # noqa: BLE001 - a client closed meanwhile, ...
            if self.client.status != "running":
                self._lost(err)
            raise
        if workers:
            if self.no_workers_since is not None:
                log.warning("evaluate: %s has %d worker(s) again; the run goes on.", self.backend.where(self.client), workers)
            self.no_workers_since = None
            return
        if self.no_workers_since is None:
            self.no_workers_since = now
            log.warning(
                "evaluate: %s has no workers; the run stops in %g s (compute.no_workers_timeout) unless workers join.",
                self.backend.where(self.client), timeout,
            )
        elif now - self.no_workers_since >= timeout:
            self._fail(self._no_workers)

    def _stop(self) -> None:
        """Mark the tiles finished meanwhile done; cancel the others (when the scheduler is there)."""
        finished = [t for f, t in self.pending.items() if f.status in ("finished", "lost")]
        if self.client.status == "running" and not self.scheduler_lost:
            with contextlib.suppress(Exception):
                self.client.cancel(list(self.pending))
        self.pending.clear()
        self._mark(finished)

    def _fail(self, message: Callable[..., str], *args: Any) -> NoReturn:
        """Stop, then raise ``message(*args)`` (made after the finished tiles are marked: it counts them)."""
        self._stop()
        raise EvaluationError(message(*args))

    def _no_workers(self) -> str:
        address = _scheduler_address(self.client) or "tcp://host:8786"
        if self.backend.scheduler:
            fix = (f"start workers (`dask worker {address}`) and re-run the same command to resume, or raise "
                   "compute.no_workers_timeout")
        else:
            fix = ("its nannies could not restart them (see the dask log above); re-run the same command to resume, "
                   "with compute.backend=local if it happens again, or raise compute.no_workers_timeout")
        return (
            f"evaluate: {self.backend.where(self.client)}: the dask cluster has had no workers for "
            f"{self.backend.no_workers_timeout:g} s "
            f"({_kept(self.store)}); {fix}."
        )

    def _lost(self, err: BaseException | None, what: str | None = None) -> NoReturn:
        """Stop, asking nothing more of the scheduler, and raise what happened to it."""
        self.scheduler_lost = True
        self._fail(self._lost_scheduler, err, what)

    def _lost_scheduler(self, err: BaseException | None, what: str | None = None) -> str:
        address = _scheduler_address(self.client) or str(self.backend.scheduler)
        if what:
            cause = what
        elif err is None or getattr(err, "reason", None) == "scheduler-connection-lost":
            cause = f"CommClosedError: the connection Client->Scheduler to {address} closed"
        else:
            cause = _describe(err)
        gone = _refused(address)
        if gone:
            cause += f"; it refuses new connections ({gone})"
        fix = (f"restart the scheduler and its workers (`dask scheduler`, `dask worker {address}`) and re-run the same "
               "command to resume (or resume here with compute.backend=local)" if self.backend.scheduler else
               "re-run the same command to resume (or with compute.backend=local)")
        return (
            f"evaluate: {self.backend.where(self.client)}: lost the dask scheduler ({cause}); "
            f"{_kept(self.store)}; {fix}."
        )


def _same_failures(failed: list[tuple[Tile, BaseException]], done: int, todo: int) -> list[Tile]:
    """The failed tiles, when the first ones of a run all failed alike before any tile finished."""
    if done or len(failed) < min(_ALIKE_FAILURES, todo):
        return []
    first = _describe(failed[0][1])
    return [t for t, e in failed] if all(_describe(e) == first for _, e in failed) else []


def _scheduler_address(client: Any) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # noqa: BLE001 - informational only
        return ""


def _refused(address: str) -> str:
    """``"ConnectionRefusedError: ..."`` when nothing listens at ``address`` any more, else ""."""
    try:
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port

        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return ""
        socket.create_connection(parse_host_port(location), timeout=2).close()
    except OSError as err:
        return _describe(err)
    except Exception:  # noqa: BLE001 - informational only
        return ""
    return ""


@contextlib.contextmanager
def _silenced(name: str, when: bool) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    if when:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep dask's INFO chatter (workers starting, closing) out of the pipeline's log."""
    import distributed  # noqa: F401 - importing it configures its loggers; adjust them after

    logger = logging.getLogger("distributed")
    level = logger.level
    if os.environ.get("DASK_LOGGING__DISTRIBUTED") is None and logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _exception_of(future: Any) -> BaseException:
    try:
        return future.exception() or RuntimeError(f"task {future.key} ended {future.status}")
    except BaseException as err:  # noqa: BLE001 - a cancelled future raises instead of returning
        return err


def _n_workers(client: Any) -> int:
    if client.status != "running":
        return 0  # asking would wait for a reconnection
    try:
        return len(client.scheduler_info(n_workers=-1)["workers"])
    except Exception:  # noqa: BLE001 - informational only
        return 0


def _layout_token(store: LandscapeStore) -> str:
    """``<fingerprint[:8]>-<hash of path and tile layout>``: deterministic, unique per store."""
    fingerprint = str(store.attrs.get("fingerprint") or "nofinger")
    layout = f"{store.path}|{store.shape}|{store.tile_shape}|{store.metrics}"
    return f"{fingerprint[:8]}-{hashlib.sha256(layout.encode()).hexdigest()[:6]}"


def _failure_message(store: LandscapeStore, tiles: Sequence[Tile], failed: list[tuple[Tile, BaseException]]) -> str:
    failed = sorted(failed, key=lambda f: f[0].index)
    shown = failed[:10]
    lines = [f"  tile {t.index} ({_span(t)}): {_describe(e)}" for t, e in shown]
    if len(failed) > len(shown):
        lines.append(f"  ... and {len(failed) - len(shown)} more")
    ok = len(tiles) - len(failed)
    return (
        f"evaluate: {len(failed)} of {len(tiles)} tile(s) failed on dask after {TILE_RETRIES} retries:\n"
        + "\n".join(lines)
        + f"\nThe other {ok} tile(s) are written and marked done in {store.path}; fix the cause and "
        "re-run the same command: it resumes with the failed tiles only."
    )


def _span(tile: Tile) -> str:
    return "grid indices " + ", ".join(f"{s.start}:{s.stop}" for s in tile.slices)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    wrapped = re.fullmatch(r"""(\w+)\((['"])(.*)\2\)""", text[0])  # dask's Exception('KeyError("...")')
    if type(err) is Exception and wrapped:
        return f"{wrapped[1]}: {wrapped[3][:300]}"
    return f"{type(err).__name__}: {text[0][:300]}"


#: Without a terminal, the progress goes to stderr as a line every this fraction of the grid ...
LOG_EVERY_FRACTION = 0.1
#: ... or every this many seconds, whichever comes first.
LOG_EVERY_SECONDS = 30.0


def _bar(store: LandscapeStore, tiles: Sequence[Tile], enabled: bool, *, stream: Any = None):
    """One bar for the whole grid: points (already done ones counted), points/s, ETA.

    On a terminal a tqdm bar; otherwise (a pipe, a log file, a CI job) a `_ProgressLog` that
    writes a plain line every 10 % of the grid or every 30 s, and one at the end.
    """
    stream = sys.stderr if stream is None else stream
    total = store.grid.size
    todo = sum(t.size for t in tiles)
    if not enabled:
        return _ProgressLog(total, total - todo, None)
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _ProgressLog(total, total - todo, stream)
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=total - todo, unit="pt", desc="evaluate", smoothing=0.1, file=stream,
        dynamic_ncols=True,
    )


class _ProgressLog:
    """Progress as log lines: ``evaluate: 120/441 points (27 %), 3.1 s elapsed, ~8 s left``.

    A line when the grid passes the next 10 % mark (`LOG_EVERY_FRACTION`) or `LOG_EVERY_SECONDS`
    after the last line, and one at `close` unless the last line said it all. The rate, and so
    the time left, counts only the points of this run (a resumed run starts past 0 %).
    ``stream=None`` writes nothing.
    """

    def __init__(self, total: int, initial: int, stream: Any, *, clock: Callable[[], float] = time.monotonic):
        self.total, self.initial, self.n = total, initial, initial
        self.stream, self.clock = stream, clock
        self.started = self.last_time = clock()
        self.last_n = initial
        self.next_mark = self._mark_after(initial)

    def _mark_after(self, n: int) -> int:
        step = max(1, round(self.total * LOG_EVERY_FRACTION))
        return (n // step + 1) * step

    def update(self, n: int) -> None:
        self.n += n
        now = self.clock()
        if self.n >= self.next_mark or now - self.last_time >= LOG_EVERY_SECONDS:
            self._line(now)

    def close(self) -> None:
        if self.n != self.last_n:
            self._line(self.clock())

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        """Said on the next line (tqdm's bar shows it beside the count)."""
        self.postfix = text

    def _line(self, now: float) -> None:
        self.last_time, self.last_n, self.next_mark = now, self.n, self._mark_after(self.n)
        if self.stream is None:
            return
        elapsed = now - self.started
        done_here = self.n - self.initial
        pct = 100 * self.n // self.total if self.total else 100
        text = f"evaluate: {self.n}/{self.total} points ({pct} %), {elapsed:.1f} s elapsed"
        if self.n < self.total and done_here > 0 and elapsed > 0:
            text += f", ~{(self.total - self.n) * elapsed / done_here:.0f} s left"
        if getattr(self, "postfix", ""):
            text += f" [{self.postfix}]"
        print(text, file=self.stream, flush=True)


def make_backend(compute_cfg: ComputeConfig) -> Backend:
    """The backend named by ``compute.backend``: ``local`` or ``dask``.

    Raises:
        ConfigurationError: an unknown backend, or ``compute.scheduler`` set without
            ``compute.backend=dask``.
    """
    backend, scheduler = str(compute_cfg.backend), compute_cfg.scheduler
    if backend == "local":
        if scheduler:
            raise ConfigurationError(
                f"compute.scheduler={scheduler!r} is set but compute.backend=local ignores it; "
                "set compute.backend=dask to run on that scheduler, or compute.scheduler=null."
            )
        return LocalBackend()
    if backend == "dask":
        device = str(compute_cfg.device)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return DaskBackend(
            workers=compute_cfg.workers, threads_per_worker=compute_cfg.threads_per_worker,
            scheduler=scheduler, device=device,
            connect_timeout=float(
                compute_cfg.connect_timeout or os.environ.get("LANDSCAPES_DASK_CONNECT_TIMEOUT") or CONNECT_TIMEOUT
            ),
            no_workers_timeout=compute_cfg.no_workers_timeout,
        )
    raise ConfigurationError(f"compute.backend={backend!r} is not a backend; choose local or dask.")
