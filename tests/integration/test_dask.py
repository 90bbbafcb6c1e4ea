"""The dask backend on a real two-worker cluster: same values as local, dying workers, failing tiles.

One module-scoped ``LocalCluster(n_workers=2, threads_per_worker=1)`` serves every test through
``compute.scheduler`` (so the "existing scheduler" path is the one tested); the backend's own
cluster (``compute.scheduler=null``) is started once, in `test_backend_starts_and_closes_its_own_cluster`.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from landscapes.errors import ConfigurationError, EvaluationError, StoreError, StoreWriteError
from landscapes.store import LandscapeStore
from pipelines.backends import DaskBackend, LocalBackend, make_backend
from pipelines.config import PipelineConfig, register_configs, to_typed
from pipelines.demo import DemoMLP
from pipelines.stages.directions import DirectionsInputs, directions
from pipelines.stages.evaluate import EvaluateInputs, evaluate

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("model", "data", "metrics", "grid", "compute", "checkpoint", "directions")
FINGERPRINT = "d" * 64
RTOL = 1e-6
WORKER_ENV = "LANDSCAPES_TEST_DASK_WORKER"


# --- losses that misbehave on dask workers (importable by the workers: tests/ is a package) ---


def _on_worker() -> bool:
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


class KillOnceLoss(nn.Module):
    """Cross-entropy; the first call in a dask worker kills that worker's process, once per marker."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _on_worker():
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)  # the worker process dies mid-tile, as with a segfault or the OOM killer
        return self.ce(outputs, target)


class FailAboveLoss(nn.Module):
    """Cross-entropy that raises above ``limit`` while the file ``switch`` exists (on workers)."""

    def __init__(self, switch: str, limit: float):
        super().__init__()
        self.switch, self.limit = switch, limit
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.ce(outputs, target)
        if _on_worker() and os.path.exists(self.switch) and float(value) > self.limit:
            raise RuntimeError(f"loss {float(value):.3f} above {self.limit}")
        return value


class BadLabelsAboveLoss(nn.Module):
    """Cross-entropy; on workers, above ``limit``, labels past the model's 10 classes (IndexError)."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.ce(outputs, target)
        if _on_worker() and float(value) > self.limit:
            return self.ce(outputs, target + 10)  # IndexError: Target 1x is out of bounds.
        return value


class BuggyOnWorkers(nn.CrossEntropyLoss):
    """A loss that fails the same way at every call on the workers (a custom loss with a bug)."""

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _on_worker():
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (128x10 and 12x1)")
        return super().forward(outputs, target)


class NotOnWorkers(nn.CrossEntropyLoss):
    """A loss whose code the workers lack: unpickling it there fails as a missing module would."""

    def __setstate__(self, state: dict) -> None:
        if os.environ.get(WORKER_ENV):
            raise ModuleNotFoundError("No module named 'my_private_losses'")
        super().__setstate__(state)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        env={"DASK_LOGGING__DISTRIBUTED": "warning", WORKER_ENV: "1"},
    ) as c:
        yield c


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A demo-MLP checkpoint and its seeded directions, made once."""
    root = tmp_path_factory.mktemp("dask")
    cfg = make_cfg(root)
    torch.manual_seed(0)
    ckpt = root / "ckpt.pt"
    torch.save(DemoMLP().state_dict(), ckpt)
    dirs = directions(cfg, DirectionsInputs(ckpt, (), root / "directions"))
    return {"root": root, "checkpoint": ckpt, "directions": dirs.path}


def make_cfg(root: Path, *overrides: str) -> PipelineConfig:
    """The typed config the evaluate stage reads, composed from conf/ like a real run."""
    register_configs()
    base = [f"paths.root_dir={root}", f"paths.output_dir={root}/out", "debug=default", "grid.steps=[9,7]", "grid.range=[[-1,1],[-0.5,1.5]]"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*base, *overrides])
    return to_typed(cfg)


def run_evaluate(setup, store: Path, backend, *overrides: str, loss: dict | None = None, fingerprint: str = FINGERPRINT):
    cfg = make_cfg(setup["root"], *overrides)
    if loss is not None:
        cfg.metrics.loss = loss
    inputs = EvaluateInputs(setup["checkpoint"], setup["directions"], store, fingerprint)
    return evaluate(cfg, inputs, backend)


def values(store: Path) -> dict[str, np.ndarray]:
    s = LandscapeStore.open(store, mode="r")
    assert s.is_complete()
    return {m: s.read(m) for m in s.metrics}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=0, err_msg=name)


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, np.ndarray]:
    """The local backend's landscape, one tile per row (7 points)."""
    out = run_evaluate(setup, setup["root"] / "reference" / "landscape.zarr", LocalBackend(), "compute.max_batch_points=7")
    assert out.tiles_computed == 9 and out.backend == "local"
    return values(out.store)


def on(cluster, **kw) -> DaskBackend:
    return DaskBackend(scheduler=cluster.scheduler_address, connect_timeout=30, **kw)


# --- the same landscape whatever runs it -----------------------------------------------------


@pytest.mark.parametrize("tile_points", [1, 5, 7, 64], ids=lambda n: f"max_batch_points={n}")
def test_dask_equals_local(cluster, setup, reference, tmp_path: Path, tile_points: int) -> None:
    out = run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), f"compute.max_batch_points={tile_points}")
    store = LandscapeStore.open(out.store, mode="r")
    assert out.backend == "dask"
    assert out.tiles_computed == len(store.tiles()) and out.tiles_reused == 0
    assert_same(values(out.store), reference)
    assert store.attrs["evaluation"]["backend"] == "dask"


def test_local_tile_size_does_not_matter(setup, reference, tmp_path: Path) -> None:
    out = run_evaluate(setup, tmp_path / "landscape.zarr", LocalBackend(), "compute.max_batch_points=4")
    assert out.tile_shape == (1, 4)
    assert_same(values(out.store), reference)


def test_backend_starts_and_closes_its_own_cluster(setup, reference, tmp_path: Path) -> None:
    backend = make_backend(make_cfg(setup["root"], "compute.backend=dask", "compute.workers=2").compute)
    assert isinstance(backend, DaskBackend) and backend.scheduler is None
    out = run_evaluate(setup, tmp_path / "landscape.zarr", backend, "compute.max_batch_points=16")
    assert_same(values(out.store), reference)
    assert {k: backend.last_run[k] for k in ("tiles_done", "tiles_failed", "workers")} == {
        "tiles_done": out.tiles_computed, "tiles_failed": 0, "workers": 2}
    assert out.metrics["backend_start_seconds"] > 0 and out.metrics["backend_workers"] == 2


def test_a_second_run_on_a_done_store_computes_nothing(cluster, setup, tmp_path: Path) -> None:
    first = run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), "compute.max_batch_points=7")
    again = run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), "compute.max_batch_points=3")
    assert (again.tiles_computed, again.tiles_reused) == (0, first.tiles_computed)
    assert again.tile_shape == first.tile_shape  # the store keeps its own tiles


# --- failures --------------------------------------------------------------------------------


def test_a_dying_worker_is_replaced_and_its_tile_retried(cluster, setup, reference, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    loss = {"_target_": f"{__name__}.KillOnceLoss", "marker": str(marker)}
    out = run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), "compute.max_batch_points=7", loss=loss)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert out.tiles_computed == 9
    assert_same(values(out.store), reference)
    client = distributed.Client(cluster.scheduler_address, timeout=30, set_as_default=False)
    try:
        client.wait_for_workers(2, timeout=30)  # the nanny brought the dead worker back
        pids = client.run(os.getpid)
    finally:
        client.close()
    assert int(marker.read_text()) not in pids.values()


def test_failing_tiles_are_listed_and_the_rest_finish(cluster, setup, reference, tmp_path: Path) -> None:
    switch = tmp_path / "fail"
    switch.touch()
    loss = {"_target_": f"{__name__}.FailAboveLoss", "switch": str(switch), "limit": 2.5}
    store_path = tmp_path / "landscape.zarr"
    with pytest.raises(EvaluationError, match=r"(?s)tile\(s\) failed on dask after 2 retries:\n  tile \(0, 1\).*"
                       r"RuntimeError: loss 2\.5\d\d above 2\.5.*re-run the same command: it resumes"):
        run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    store = LandscapeStore.open(store_path, mode="r")
    missing = {t.index for t in store.missing_tiles()}
    assert missing == {(0, 1)} | {(i, 2) for i in range(9)}  # every tile with a loss above 2.5
    done_values = store.read("loss")
    for tile in store.tiles():
        block = done_values[tile.slices]
        assert np.isnan(block).all() if tile.index in missing else np.isfinite(block).all()

    switch.unlink()  # the cause is fixed: the same command resumes with the failed tiles only
    out = run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    assert (out.tiles_computed, out.tiles_reused) == (len(missing), len(store.tiles()) - len(missing))
    assert_same(values(store_path), reference)


@pytest.mark.slow
def test_a_full_disk_on_a_worker_passes_through_unwrapped(cluster, setup, reference, tmp_path: Path) -> None:
    switch = tmp_path / "fail"
    switch.touch()
    loss = {"_target_": f"{__name__}.FailAboveLoss", "switch": str(switch), "limit": 2.5}
    store_path = tmp_path / "landscape.zarr"
    with pytest.raises(EvaluationError):  # leaves tile (0, 1) and the column (i, 2) to do
        run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    switch.unlink()
    blocked = store_path / "loss" / "c" / "4" / "2"  # where tile (4, 2)'s loss chunk goes: a folder in the way
    blocked.mkdir(parents=True)
    with pytest.raises(StoreWriteError, match=rf"^write_tile: cannot write tile \(4, 2\) of {re.escape(str(store_path))}: "
                       r"\[Errno 21 EISDIR\] Is a directory.*; fix the cause and re-run the same command to resume; "
                       r"finished tiles are kept\.$") as info:
        run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    assert type(info.value) is StoreWriteError  # not wrapped in an EvaluationError listing tiles
    store = LandscapeStore.open(store_path, mode="r")
    kept = int(store.done_mask().sum())
    assert (4, 2) in {t.index for t in store.missing_tiles()}

    blocked.rmdir()  # space freed: the same command resumes
    out = run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    assert (out.tiles_reused, out.tiles_computed) == (kept, len(store.tiles()) - kept)
    assert_same(values(store_path), reference)


def test_labels_out_of_range_on_dask_stop_the_run_and_say_it_is_the_data(cluster, setup, reference, tmp_path: Path) -> None:
    store_path = tmp_path / "landscape.zarr"
    loss = {"_target_": f"{__name__}.BadLabelsAboveLoss", "limit": 2.5}
    with pytest.raises(EvaluationError, match=r"^evaluate: tile \(\d, \d\) \(grid indices .*\) failed on dask after 2 "
                       r"retries: IndexError: Target 1\d is out of bounds\. This is most likely a problem of the data or "
                       r"the metrics \(e\.g\. labels outside the model's output classes\), not a passing fault, so "
                       r"re-running will fail the same way: check data\.\* and metrics\.\* against the model; (\d+) of 27 "
                       r"tile\(s\) done are kept in .* \(a re-run with the same data and metrics reuses them\)\.$") as info:
        run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3", loss=loss)
    kept = int(LandscapeStore.open(store_path, mode="r").done_mask().sum())
    assert f"; {kept} of 27 tile(s) done are kept" in str(info.value)
    out = run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=3")  # labels fixed: resumes
    assert (out.tiles_reused, out.tiles_computed) == (kept, 27 - kept)
    assert_same(values(store_path), reference)


def test_the_first_tiles_failing_alike_stop_the_run(cluster, setup, tmp_path: Path) -> None:
    store_path = tmp_path / "landscape.zarr"
    loss = {"_target_": f"{__name__}.BuggyOnWorkers"}
    with pytest.raises(EvaluationError, match=r"^evaluate: the first \d tiles \(.*\) failed on every try \(3 each\) with "
                       r"the same error, before any tile of this run finished: RuntimeError: mat1 and mat2 shapes cannot be "
                       r"multiplied \(128x10 and 12x1\)\. This is most likely a problem of the data, the model or the "
                       r"metrics \(or of the workers' set-up\), not a passing fault, so re-running as is will fail the same "
                       r"way: fix the cause first; 0 of 9 tile\(s\) done are kept in .*\.$"):
        run_evaluate(setup, store_path, on(cluster), "compute.max_batch_points=7", loss=loss)
    assert not LandscapeStore.open(store_path, mode="r").done_mask().any()


def test_unreachable_scheduler(setup, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = DaskBackend(scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=1)
    with pytest.raises(ConfigurationError, match=rf"compute.scheduler='tcp://127.0.0.1:{port}': no dask scheduler "
                       r"answered within 1 s \(ConnectionRefusedError: .*\); start one there .*compute.scheduler=null "
                       r"to start a local cluster"):
        run_evaluate(setup, tmp_path / "landscape.zarr", backend)
    assert not LandscapeStore.open(tmp_path / "landscape.zarr").done_mask().any()


@pytest.mark.parametrize("overrides,match", [
    (["compute.scheduler=tcp://h:8786"], r"compute.scheduler='tcp://h:8786' is set but compute.backend=local ignores it"),
    (["compute.backend=dask", "compute.workers=0"], r"compute.workers=0: expected a positive integer"),
    (["compute.backend=dask", "compute.threads_per_worker=0"], r"compute.threads_per_worker=0: expected a positive integer"),
    (["compute.backend=dask", "compute.no_workers_timeout=0"], r"compute.no_workers_timeout=0.0: expected a positive number "
     r"of seconds; set compute.no_workers_timeout=60"),
], ids=["scheduler-without-dask", "no-workers", "no-threads", "no-workers-timeout"])
def test_bad_compute_options(setup, overrides, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make_backend(make_cfg(setup["root"], *overrides).compute)


def test_workers_that_cannot_load_the_model_code(cluster, setup, reference, tmp_path: Path) -> None:
    loss = {"_target_": f"{__name__}.NotOnWorkers"}
    with pytest.raises(ConfigurationError, match=r"evaluate: the workers of compute.scheduler='tcp://.*' cannot load the "
                       r"evaluator \(ModuleNotFoundError: No module named 'my_private_losses'\); install `landscapes` and "
                       r"the model's code in the workers' environment"):
        run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), loss=loss)
    # the failed plugin was unregistered: the cluster still works for the next run
    out = run_evaluate(setup, tmp_path / "again.zarr", on(cluster), "compute.max_batch_points=7")
    assert_same(values(out.store), reference)


def test_scheduler_without_workers(setup, tmp_path: Path) -> None:
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        backend = DaskBackend(scheduler=empty.scheduler_address, connect_timeout=1)
        with pytest.raises(ConfigurationError, match=r"compute.scheduler='tcp://.*': the scheduler has no workers after 1 s; "
                           r"start workers with `dask worker tcp://"):
            run_evaluate(setup, tmp_path / "landscape.zarr", backend)


def test_no_workers_timeout_comes_from_the_config(setup) -> None:
    backend = make_backend(make_cfg(setup["root"], "compute.backend=dask", "compute.no_workers_timeout=7.5").compute)
    assert isinstance(backend, DaskBackend) and backend.no_workers_timeout == 7.5
    assert make_backend(make_cfg(setup["root"], "compute.backend=dask").compute).no_workers_timeout == 60


def test_connect_timeout_from_the_config_or_the_environment(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    def timeout(*overrides: str) -> float:
        return make_backend(make_cfg(setup["root"], "compute.backend=dask", *overrides).compute).connect_timeout

    monkeypatch.delenv("LANDSCAPES_DASK_CONNECT_TIMEOUT", raising=False)
    assert timeout() == 10.0
    monkeypatch.setenv("LANDSCAPES_DASK_CONNECT_TIMEOUT", "2.5")
    assert timeout() == 2.5
    assert timeout("compute.connect_timeout=30") == 30.0  # the config wins over the environment


def test_malformed_scheduler_address(setup, tmp_path: Path) -> None:
    backend = make_backend(make_cfg(setup["root"], "compute.backend=dask", "compute.scheduler=my-laptop").compute)
    with pytest.raises(ConfigurationError, match=r"compute.scheduler='my-laptop' is not a dask scheduler address "
                       r"\(ValueError: missing port number .*\); give it as tcp://host:8786"):
        run_evaluate(setup, tmp_path / "landscape.zarr", backend)


def test_store_of_another_configuration_is_refused(cluster, setup, tmp_path: Path) -> None:
    run_evaluate(setup, tmp_path / "landscape.zarr", LocalBackend(), "compute.max_batch_points=64")
    with pytest.raises(StoreError, match=r"was created for another configuration .*refusing to mix results"):
        run_evaluate(setup, tmp_path / "landscape.zarr", on(cluster), fingerprint="e" * 64)
