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
  :class:`~landscapes.errors.EvaluationError` lists the failed tiles and says how to resume.
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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from landscapes.errors import ConfigurationError, EvaluationError, ShapeMismatchError
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
#: Errors that say the configuration is wrong: every tile would fail the same way.
_CONFIG_ERRORS = (ConfigurationError, ShapeMismatchError)


class Backend(Protocol):
    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        """Evaluate ``tiles``, write them to ``store``, mark them done; return the seconds spent."""


# --- local -----------------------------------------------------------------------------------


class LocalBackend:
    """Tiles one after another in this process; each tile is written and marked done at once.

    The first failing tile stops the run (the error would most likely repeat on every tile);
    the tiles finished before it stay in the store, and re-running resumes after them.
    """

    name = "local"

    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        started = time.perf_counter()
        bar = _bar(store, tiles, progress)
        done = 0
        try:
            with evaluator.hold_memory():  # freed activations reused across tiles
                for tile in tiles:
                    try:
                        values = evaluator.evaluate_tile(store.grid, tile)
                        store.write_tile(tile, values)
                    except _CONFIG_ERRORS:
                        raise
                    except Exception as err:
                        raise EvaluationError(
                            f"evaluate: tile {tile.index} ({_span(tile)}) failed: {_describe(err)}. "
                            f"{done} tile(s) of this run are kept in {store.path}; fix the cause and "
                            f"re-run the same command to resume ({len(tiles) - done} tile(s) left)."
                        ) from err
                    store.mark_done([tile])
                    done += 1
                    bar.update(tile.size)
        finally:
            bar.close()
        return time.perf_counter() - started


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
        cluster_kwargs: extra keyword arguments of the local cluster.

    Raises:
        ConfigurationError: non-positive ``workers`` or ``threads_per_worker``.
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
        cluster_kwargs: Mapping[str, Any] | None = None,
    ):
        for key, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"compute.{key}={value!r}: expected a positive integer; set compute.{key}=1 or more.")
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.scheduler = scheduler or None
        self.device = str(device)
        self.connect_timeout = float(connect_timeout)
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
                the evaluator (``landscapes`` or the model's code missing there).
            EvaluationError: some tiles failed after their retries; the others are done.
        """
        started = time.perf_counter()
        tiles = list(tiles)
        if not tiles:
            return 0.0
        with _quiet_distributed():
            return self._run(evaluator, store, tiles, progress=progress, started=started)

    def _run(self, evaluator: Evaluator, store: LandscapeStore, tiles: list[Tile], *, progress: bool, started: float) -> float:
        from distributed import as_completed

        client, cluster = self.connect()
        token = _layout_token(store)
        plugin_name = f"landscapes-evaluator-{token}"
        failed: list[tuple[Tile, BaseException]] = []
        done = 0
        bar = None
        timings = {"start_seconds": 0.0, "compute_seconds": 0.0}
        try:
            self._install(client, evaluator, plugin_name)
            timings["start_seconds"] = time.perf_counter() - started
            bar = _bar(store, tiles, progress)  # from here on: points/s and ETA of the tiles alone
            layout = (tuple(store.shape), tuple(store.tile_shape), tuple(store.metrics))
            keys = [f"tile-{token}-{'-'.join(str(i) for i in t.index)}" for t in tiles]
            futures = client.map(
                evaluate_and_write_tile, [plugin_name] * len(tiles), [str(store.path)] * len(tiles),
                [layout] * len(tiles), tiles, key=keys, retries=TILE_RETRIES,
            )
            pending = dict(zip(futures, tiles, strict=True))
            del futures
            for batch in as_completed(list(pending), loop=client.loop).batches():  # what finished meanwhile
                finished = []
                for future in batch:
                    tile = pending.pop(future)
                    if future.status == "finished":
                        finished.append(tile)
                    else:
                        failed.append((tile, _exception_of(future)))
                        bar.set_postfix_str(f"{len(failed)} tile(s) failed", refresh=False)
                    future.release()
                store.mark_done(finished)  # the driver alone writes the done mask, once per batch
                done += len(finished)
                bar.update(sum(t.size for t in finished))
            timings["compute_seconds"] = time.perf_counter() - started - timings["start_seconds"]
        finally:
            if bar is not None:
                bar.close()
            self.last_run = {"tiles_done": done, "tiles_failed": len(failed), "workers": _n_workers(client)}
            closing = time.perf_counter()
            self._close(client, cluster, plugin_name)
            self.last_run |= timings | {"close_seconds": time.perf_counter() - closing}
        if failed:
            raise EvaluationError(_failure_message(store, tiles, failed))
        return time.perf_counter() - started

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
    def _close(client: Any, cluster: Any, plugin_name: str) -> None:
        try:
            if cluster is None and client.status == "running":  # a user's scheduler lives on
                client.unregister_worker_plugin(plugin_name)
        except Exception as err:  # noqa: BLE001 - best effort; the plugin is only memory
            log.debug("could not unregister %s: %s", plugin_name, err)
        finally:
            try:
                client.close()
            finally:
                if cluster is not None:
                    cluster.close()


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


def _bar(store: LandscapeStore, tiles: Sequence[Tile], enabled: bool):
    """One bar for the whole grid: points (already done ones counted), points/s, ETA."""
    from tqdm.auto import tqdm

    total = store.grid.size
    todo = sum(t.size for t in tiles)
    # quiet when not on a terminal (disable=None), or when switched off
    return tqdm(
        total=total, initial=total - todo, unit="pt", desc="evaluate", smoothing=0.1, file=sys.stderr,
        disable=None if enabled else True, dynamic_ncols=True,
    )


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
        )
    raise ConfigurationError(f"compute.backend={backend!r} is not a backend; choose local or dask.")
