"""Fail fast, say why: a dask cluster that loses its workers or its scheduler, a full disk, bad labels.

The cluster tests start a real ``dask scheduler`` on a free loopback port and real ``dask worker``
processes (``--nthreads 1``), kill them with SIGKILL mid-run, and check that the driver stops
within ``compute.no_workers_timeout`` (or at once, for the scheduler) with one message that names
the scheduler and the cause, keeps the finished tiles, and that the same command resumes to the
same landscape as the local backend's, computing no tile twice. Every process started here is
killed in a fixture's ``finally``, also when a test fails.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from landscapes.errors import EvaluationError, StoreError, StoreWriteError
from landscapes.store import LandscapeStore
from pipelines.backends import DaskBackend, LocalBackend, make_backend
from pipelines.demo import DemoMLP
from pipelines.stages.directions import DirectionsInputs, directions
from tests.integration.test_dask import (
    REPO,
    _on_worker,
    assert_same,
    make_cfg,
    run_evaluate,
    values,
)

distributed = pytest.importorskip("distributed")

DASK = str(Path(sys.executable).parent / "dask")
TILES = 63  # the 9 x 7 grid, one point per tile (compute.max_batch_points=1)
ONE_POINT = "compute.max_batch_points=1"
NO_WORKERS_TIMEOUT = 5.0


# --- losses (importable by the workers: the repository is on their PYTHONPATH) ----------------


class SlowLoss(nn.Module):
    """Cross-entropy that sleeps ``delay`` seconds per call on dask workers (never in the driver)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _on_worker():
            time.sleep(self.delay)
        return self.ce(outputs, target)


class BadLabelsAfter(nn.Module):
    """Cross-entropy; after ``calls`` calls the labels are shifted past the model's 10 classes,
    as a dataset with more classes than the model gives (``IndexError: Target 1x is out of bounds``)."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls, self.count = calls, 0
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.ce(outputs, target + 10 if self.count > self.calls else target)


class AlwaysFails(nn.Module):
    """A loss that fails the same way at every call (a custom metric with a bug)."""

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (128x10 and 12x1)")


class FailsOnce(nn.Module):
    """A loss whose first call fails (a passing fault); every later call works."""

    def __init__(self):
        super().__init__()
        self.failed = False
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a passing fault")
        return self.ce(outputs, target)


def slow(delay: float = 0.15) -> dict[str, Any]:
    return {"_target_": f"{__name__}.SlowLoss", "delay": delay}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A demo-MLP checkpoint and its seeded directions, made once."""
    root = tmp_path_factory.mktemp("faults")
    cfg = make_cfg(root)
    torch.manual_seed(0)
    ckpt = root / "ckpt.pt"
    torch.save(DemoMLP().state_dict(), ckpt)
    dirs = directions(cfg, DirectionsInputs(ckpt, (), root / "directions"))
    return {"root": root, "checkpoint": ckpt, "directions": dirs.path}


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, np.ndarray]:
    """The local backend's landscape, one tile per row."""
    out = run_evaluate(setup, setup["root"] / "reference" / "landscape.zarr", LocalBackend(), "compute.max_batch_points=7")
    return values(out.store)


class Processes:
    """A real scheduler and workers on loopback, each in its own process group (SIGKILL kills all of it)."""

    def __init__(self, logs: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = logs
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.env = os.environ | {
            "DASK_LOGGING__DISTRIBUTED": "warning",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        try:
            return subprocess.Popen([DASK, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()

    def start_scheduler(self) -> None:
        self.scheduler = self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                     "--no-dashboard")
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.scheduler.poll() is not None:
                    raise RuntimeError(f"the test's dask scheduler did not start: see {self.logs}/scheduler.log") from None
                time.sleep(0.1)

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            self.workers.append(self._start(f"worker-{len(self.workers)}", "worker", self.address, "--nthreads", "1",
                                            "--no-dashboard"))
        with distributed.Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=60)

    def kill_workers(self) -> None:
        for p in self.workers:
            _kill(p)
        self.workers = []

    def kill_scheduler(self) -> None:
        if self.scheduler is not None:
            _kill(self.scheduler)

    def stop_scheduler(self) -> None:
        """SIGSTOP: the scheduler hangs, its connections stay open (SIGKILL in ``close`` still ends it)."""
        if self.scheduler is not None:
            os.killpg(self.scheduler.pid, signal.SIGSTOP)

    def close(self) -> None:
        self.kill_workers()
        self.kill_scheduler()


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the process and its group (the worker's nanny and the worker process under it)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        procs.start_scheduler()
        yield procs
    finally:
        procs.close()


def when_done(store: Path, tiles: int, action: Callable[[], None]) -> tuple[threading.Thread, dict[str, float]]:
    """A thread that calls ``action`` once ``tiles`` tiles of ``store`` are marked done; the time it did."""
    when: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if LandscapeStore.open(store, mode="r").done_mask().sum() >= tiles:
                    action()
                    when["at"] = time.monotonic()
                    return
            except Exception:  # noqa: BLE001 - not created yet, or read while being written
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, when


def done_tiles(store: Path) -> int:
    return int(LandscapeStore.open(store, mode="r").done_mask().sum())


# --- the cluster loses all its workers -------------------------------------------------------


@pytest.mark.slow
def test_a_cluster_without_workers_fails_after_the_timeout_and_resumes(processes, setup, reference, tmp_path: Path) -> None:
    processes.start_workers(2)
    store = tmp_path / "landscape.zarr"
    backend = DaskBackend(scheduler=processes.address, connect_timeout=30, no_workers_timeout=NO_WORKERS_TIMEOUT)
    thread, killed = when_done(store, 4, processes.kill_workers)
    address = re.escape(processes.address)
    with pytest.raises(EvaluationError, match=(
        rf"^evaluate: compute\.scheduler='{address}': the dask cluster has had no workers for 5 s \((\d+) of 63 "
        rf"tile\(s\) done are kept in {re.escape(str(store))}\); start workers \(`dask worker {address}`\) and re-run the same "
        r"command to resume, or raise compute\.no_workers_timeout\.$")) as info:
        run_evaluate(setup, store, backend, ONE_POINT, loss=slow())
    failed_after = time.monotonic() - killed["at"]
    thread.join()
    print(f"failed {failed_after:.1f} s after the workers were killed:\n{info.value}")  # shown with pytest -rP
    assert NO_WORKERS_TIMEOUT - 0.5 <= failed_after < NO_WORKERS_TIMEOUT + 10, failed_after
    kept = done_tiles(store)
    assert 4 <= kept < TILES
    assert f"({kept} of {TILES} tile(s) done" in str(info.value)
    assert not isinstance(info.value.__cause__, Exception)  # the message is the whole story

    processes.start_workers(2)  # the cause is fixed: the same command resumes
    out = run_evaluate(setup, store, DaskBackend(scheduler=processes.address, connect_timeout=30), ONE_POINT, loss=slow(0.0))
    assert (out.tiles_reused, out.tiles_computed) == (kept, TILES - kept)  # nothing computed twice
    assert_same(values(store), reference)


# --- the scheduler dies ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_lost_scheduler_fails_at_once_and_the_local_backend_resumes(processes, setup, reference, tmp_path: Path) -> None:
    processes.start_workers(2)
    store = tmp_path / "landscape.zarr"
    backend = DaskBackend(scheduler=processes.address, connect_timeout=30)  # no_workers_timeout: 60 s
    thread, killed = when_done(store, 4, processes.kill_scheduler)
    address = re.escape(processes.address)
    with pytest.raises(EvaluationError, match=(
        rf"^evaluate: compute\.scheduler='{address}': lost the dask scheduler \(CommClosedError: the connection "
        rf"Client->Scheduler to {address} closed; it refuses new connections \(ConnectionRefusedError: .*\)\); "
        rf"(\d+) of 63 tile\(s\) done are kept in {re.escape(str(store))}; restart the scheduler and its workers \(`dask scheduler`, "
        rf"`dask worker {address}`\) and re-run the same command to resume \(or resume here with "
        r"compute\.backend=local\)\.$")) as info:
        run_evaluate(setup, store, backend, ONE_POINT, loss=slow())
    failed_after = time.monotonic() - killed["at"]
    thread.join()
    print(f"failed {failed_after:.1f} s after the scheduler was killed:\n{info.value}")  # shown with pytest -rP
    assert failed_after < 15, failed_after  # not the 60 s of no_workers_timeout, nor for ever
    assert "cancelled" not in str(info.value)
    kept = done_tiles(store)
    assert 4 <= kept < TILES
    assert f"; {kept} of {TILES} tile(s) done" in str(info.value)

    cfg_backend = make_backend(make_cfg(setup["root"], "compute.backend=local").compute)
    out = run_evaluate(setup, store, cfg_backend, ONE_POINT, loss=slow())
    assert out.backend == "local"
    assert (out.tiles_reused, out.tiles_computed) == (kept, TILES - kept)
    assert_same(values(store), reference)


@pytest.mark.slow
def test_a_hung_scheduler_fails_after_the_timeout(processes, setup, tmp_path: Path) -> None:
    processes.start_workers(1)
    store = tmp_path / "landscape.zarr"
    backend = DaskBackend(scheduler=processes.address, connect_timeout=30, no_workers_timeout=NO_WORKERS_TIMEOUT)
    thread, stopped = when_done(store, 2, processes.stop_scheduler)
    address = re.escape(processes.address)
    with pytest.raises(EvaluationError, match=(
        rf"^evaluate: compute\.scheduler='{address}': lost the dask scheduler \(TimeoutError: it answered no status "
        rf"request for 5 s\); (\d+) of 63 tile\(s\) done are kept in {re.escape(str(store))}; restart the scheduler")) as info:
        run_evaluate(setup, store, backend, ONE_POINT, loss=slow())
    failed_after = time.monotonic() - stopped["at"]
    thread.join()
    print(f"failed {failed_after:.1f} s after the scheduler was stopped:\n{info.value}")  # shown with pytest -rP
    assert failed_after < NO_WORKERS_TIMEOUT + 10, failed_after
    assert done_tiles(store) >= 2


# --- the disk fills up (local backend, in this process) --------------------------------------


class _FullDisk:
    """Wraps one Zarr array: its writes after the first ``allowed`` raise ENOSPC, as a full disk does."""

    def __init__(self, array: Any, counter: dict[str, int], allowed: int):
        self._array, self._counter, self._allowed = array, counter, allowed

    def __setitem__(self, key: Any, value: Any) -> None:
        self._counter["writes"] += 1
        if self._counter["writes"] > self._allowed:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._array[key] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __getitem__(self, key: Any) -> Any:
        return self._array[key]


@pytest.mark.parametrize("where,match", [
    ("tiles", r"write_tile: cannot write tile \(3, 0\) of {store}: \[Errno 28 ENOSPC\] No space left on device; free space "
              r"\(or raise the quota\) and re-run the same command to resume; finished tiles are kept\."),
    ("done", r"mark_done: cannot write the done mask of {store}: \[Errno 28 ENOSPC\] No space left on device; free space "
             r"\(or raise the quota\) and re-run the same command to resume; finished tiles are kept\."),
], ids=["write_tile", "mark_done"])
def test_a_full_disk_passes_through_unwrapped_and_resumes(setup, reference, tmp_path: Path, monkeypatch, where, match) -> None:
    store = tmp_path / "landscape.zarr"
    counter = {"writes": 0}
    real = LandscapeStore._array
    kept = 3

    def array(self: LandscapeStore, name: str) -> Any:
        got = real(self, name)
        if (name == "done") != (where == "done"):
            return got
        # tiles: one write per metric per tile; done: one write per tile (the stage's creation writes none)
        allowed = kept * len(self.metrics) if where == "tiles" else kept
        return _FullDisk(got, counter, allowed)

    monkeypatch.setattr(LandscapeStore, "_array", array)
    with pytest.raises(StoreWriteError, match=match.format(store=re.escape(str(store)))) as info:
        run_evaluate(setup, store, LocalBackend(), "compute.max_batch_points=7")
    assert type(info.value) is StoreWriteError and isinstance(info.value, StoreError)  # not an EvaluationError
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert done_tiles(store) == kept

    out = run_evaluate(setup, store, LocalBackend(), "compute.max_batch_points=7")
    assert (out.tiles_reused, out.tiles_computed) == (kept, 9 - kept)
    assert_same(values(store), reference)


# --- errors that re-running does not fix (local backend) -------------------------------------


def test_labels_out_of_range_say_it_is_the_data_and_keep_the_finished_tiles(setup, reference, tmp_path: Path) -> None:
    store = tmp_path / "landscape.zarr"
    loss = {"_target_": f"{__name__}.BadLabelsAfter", "calls": 21}  # 3 rows of 7 points, then bad labels
    with pytest.raises(EvaluationError, match=(
        r"^evaluate: tile \(3, 0\) \(grid indices 3:4, 0:7\) failed: IndexError: Target 1\d is out of bounds\. This is "
        r"most likely a problem of the data or the metrics \(e\.g\. labels outside the model's output classes\), not a "
        r"passing fault, so re-running will fail the same way: check data\.\* and metrics\.\* against the model; 3 of 9 "
        rf"tile\(s\) done are kept in {re.escape(str(store))} \(a re-run with the same data and metrics reuses them\)\.$")):
        run_evaluate(setup, store, LocalBackend(), "compute.max_batch_points=7", loss=loss)
    assert done_tiles(store) == 3
    out = run_evaluate(setup, store, LocalBackend(), "compute.max_batch_points=7")  # labels fixed: resumes
    assert (out.tiles_reused, out.tiles_computed) == (3, 6)
    assert_same(values(store), reference)


def test_a_first_tile_that_fails_twice_alike_is_not_called_a_passing_fault(setup, tmp_path: Path) -> None:
    store = tmp_path / "landscape.zarr"
    with pytest.raises(EvaluationError, match=(
        r"^evaluate: tile \(0, 0\) \(grid indices 0:1, 0:7\) failed twice with the same error, before any tile of this "
        r"run finished: RuntimeError: mat1 and mat2 shapes cannot be multiplied \(128x10 and 12x1\)\. This is most likely "
        r"a problem of the data, the model or the metrics \(or of the workers' set-up\), not a passing fault, so "
        r"re-running as is will fail the same way: fix the cause first; 0 of 9 tile\(s\) done are kept in .*\.$")):
        run_evaluate(setup, store, LocalBackend(), "compute.max_batch_points=7", loss={"_target_": f"{__name__}.AlwaysFails"})


def test_a_passing_fault_at_the_first_tile_is_tried_again(setup, reference, tmp_path: Path) -> None:
    out = run_evaluate(setup, tmp_path / "landscape.zarr", LocalBackend(), "compute.max_batch_points=7",
                       loss={"_target_": f"{__name__}.FailsOnce"})
    assert out.tiles_computed == 9
    assert_same(values(out.store), reference)
