"""Resume after any failure: a pipeline killed with SIGKILL mid-grid finishes on the next run.

The evaluate stage's store path follows from its fingerprint, so the same command reopens the
killed run's store and computes only the tiles its ``done`` mask lacks. NaN and inf are values
like any other: the tiles that hold them count as done, and the summary counts them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from torch import nn

from landscapes.errors import ConfigurationError, EvaluationError, ShapeMismatchError, StoreError
from landscapes.store import LandscapeStore
from pipelines.backends import LocalBackend
from pipelines.config import PipelineConfig, register_configs, to_typed
from pipelines.demo import DemoMLP
from pipelines.stages.directions import DirectionsInputs, directions
from pipelines.stages.evaluate import EvaluateInputs, evaluate

REPO = Path(__file__).resolve().parents[2]
GRID = ["grid.steps=[9,7]", "grid.range=[[-1,1],[-0.5,1.5]]", "compute.max_batch_points=5"]  # 18 tiles of ≤ 5 points
N_TILES = 18


class SlowNaNLoss(nn.Module):
    """Cross-entropy, slowed down, NaN above ``nan_above`` and +inf above ``inf_above``.

    On the test grid the top-right corner of the plane has losses above both limits, so some
    tiles hold NaN, some inf, and the first of them is the second tile in C order.
    """

    def __init__(self, delay: float = 0.0, nan_above: float = 2.4, inf_above: float = 2.6):
        super().__init__()
        self.delay, self.nan_above, self.inf_above = delay, nan_above, inf_above
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        value = self.ce(outputs, target)
        if float(value) > self.inf_above:
            return torch.full_like(value, math.inf)
        if float(value) > self.nan_above:
            return torch.full_like(value, math.nan)
        return value


def loss_overrides(delay: float) -> list[str]:
    return [f"metrics.loss._target_={__name__}.SlowNaNLoss", f"+metrics.loss.delay={delay}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    torch.save(DemoMLP().state_dict(), path)
    return path


def pipeline(root: Path, checkpoint: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.run", "debug=default", f"checkpoint.path={checkpoint}", "plot.enabled=false",
            *GRID, *overrides]


def env_for(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(LANDSCAPES_ROOT=str(root), PYTHONUNBUFFERED="1")
    return env


def run_to_end(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env_for(root), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def done_count(root: Path) -> tuple[Path | None, int]:
    stores = sorted((root / "outputs" / "stores").glob("landscape-*/landscape.zarr"))
    if not stores:
        return None, 0
    try:  # read only the done mask: the driver may be rewriting the root metadata meanwhile
        return stores[0], int(np.asarray(zarr.open_array(str(stores[0] / "done"), mode="r")[...]).sum())
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):  # not created yet
        return stores[0], 0


def kill_part_way(cmd: list[str], root: Path, *, at_least: int) -> tuple[Path, int]:
    """Start ``cmd``, SIGKILL its whole process group once ``at_least`` tiles are done."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            store, done = done_count(root)
            if done >= at_least:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc={proc.returncode}) before it was killed:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("no tile was done within 180 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and any worker it started
        proc.wait(timeout=30)
        proc.stdout.close()
    store, done = done_count(root)  # nothing writes any more: the final count
    assert store is not None and 1 <= done < N_TILES, f"killed with {done}/{N_TILES} tiles done"
    return store, done


def runs_of(root: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("landscapes")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def check_resumed(root: Path, done_before: int, reference: Path) -> dict[str, Any]:
    """The resumed run reused exactly the tiles done before the kill and matches the reference."""
    store_path, done = done_count(root)
    assert done == N_TILES
    got = LandscapeStore.open(store_path, mode="r")
    want = LandscapeStore.open(reference, mode="r")
    for m in ("loss", "accuracy"):
        np.testing.assert_allclose(got.read(m), want.read(m), rtol=1e-6, atol=0, err_msg=m)
    loss = got.read("loss")
    assert np.isnan(loss).sum() > 0 and np.isposinf(loss).sum() > 0  # NaN and inf kept as values

    client, runs = runs_of(root)
    evals = [r for r in runs if r.data.tags.get("landscapes.stage") == "evaluate"]
    finished = [r for r in evals if r.info.status == "FINISHED"]
    assert len(finished) == 1, [(r.info.status, r.data.metrics) for r in evals]
    m = finished[0].data.metrics
    assert (m["tiles_reused"], m["tiles_computed"]) == (done_before, N_TILES - done_before)  # nothing twice
    parents = [r for r in runs if r.data.tags.get("landscapes.kind") == "pipeline" and r.info.status == "FINISHED"]
    assert len(parents) == 1
    summary = parents[0].data.metrics
    assert summary["loss_nan_count"] == np.isnan(loss).sum()
    assert summary["loss_inf_count"] == np.isinf(loss).sum()
    # the killed run's parent and its running stage are closed as KILLED by the resuming run
    pipelines = [r for r in runs if r.data.tags.get("landscapes.kind") == "pipeline"]
    assert sorted(r.info.status for r in pipelines) == ["FINISHED", "KILLED"]
    killed_evals = [r for r in evals if r.info.status == "KILLED"]
    assert len(killed_evals) == 1
    assert finished[0].data.tags["landscapes.resumes"] == killed_evals[0].info.run_id
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return {"runs": runs, "evaluate": finished[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """The same landscape from one uninterrupted evaluation in this process (no delay)."""
    root = tmp_path_factory.mktemp("reference")
    cfg, inputs = stage_setup(root, checkpoint)
    out = evaluate(cfg, inputs, LocalBackend())
    assert out.tiles_computed == N_TILES
    return out.store


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(tmp_path: Path, checkpoint: Path, reference: Path) -> None:
    cmd = pipeline(tmp_path, checkpoint, *loss_overrides(0.05))
    store, done_before = kill_part_way(cmd, tmp_path, at_least=3)
    mask = LandscapeStore.open(store, mode="r").done_mask()
    assert mask[0, 1], "the tile holding NaN and inf was done before the kill"
    before = LandscapeStore.open(store, mode="r").read("loss")[0, 5:7].copy()
    assert np.isnan(before[0]) and np.isposinf(before[1])

    proc = run_to_end(cmd, tmp_path)
    assert "landscape:" in proc.stdout
    check_resumed(tmp_path, done_before, reference)


@pytest.mark.slow
def test_sigkill_of_a_dask_run_then_rerun_resumes(tmp_path: Path, checkpoint: Path, reference: Path) -> None:
    cmd = pipeline(tmp_path, checkpoint, *loss_overrides(0.05), "compute.backend=dask", "compute.workers=2")
    _, done_before = kill_part_way(cmd, tmp_path, at_least=2)
    run_to_end(cmd, tmp_path)
    check_resumed(tmp_path, done_before, reference)


# --- resume=, and what the evaluate stage refuses before computing (in-process, fast) --------


def stage_setup(root: Path, checkpoint: Path) -> tuple[PipelineConfig, EvaluateInputs]:
    """The evaluate stage's config and inputs as the pipeline makes them (directions included)."""
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/out", "debug=default", *GRID, *loss_overrides(0.0)])
    c = to_typed(cfg)
    dirs = directions(c, DirectionsInputs(checkpoint, (), root / "directions"))
    return c, EvaluateInputs(checkpoint, dirs.path, root / "a" / "landscape.zarr", "a" * 64)


@pytest.fixture
def stage(tmp_path: Path, checkpoint: Path) -> dict[str, Any]:
    cfg, inputs = stage_setup(tmp_path, checkpoint)
    return {"cfg": cfg, "inputs": inputs}


def test_resume_option_continues_a_store_elsewhere(stage, tmp_path: Path) -> None:
    cfg, inputs = stage["cfg"], stage["inputs"]
    with pytest.raises(EvaluationError):
        evaluate(with_loss(cfg, ExplodeAfter, calls=26), inputs, LocalBackend())  # 7 tiles, then a failure
    moved = tmp_path / "moved"
    shutil.copytree(inputs.store.parent, moved)
    out = evaluate(dataclasses.replace(cfg, resume=str(moved)), inputs, LocalBackend())  # the folder holding landscape.zarr works too
    assert out.store == moved / "landscape.zarr"
    assert (out.tiles_reused, out.tiles_computed) == (7, N_TILES - 7)
    assert LandscapeStore.open(out.store).is_complete()
    assert not LandscapeStore.open(inputs.store).is_complete()  # the original is left alone


def test_aggregate_refuses_an_unfinished_store(stage) -> None:
    from pipelines.stages.aggregate import AggregateInputs, aggregate

    cfg, inputs = stage["cfg"], stage["inputs"]
    with pytest.raises(EvaluationError):
        evaluate(with_loss(cfg, ExplodeAfter, calls=26), inputs, LocalBackend())
    with pytest.raises(StoreError, match=r"aggregate: 11 tile\(s\) of .*landscape\.zarr are not done; re-run the pipeline "
                       r"\(it resumes the evaluation\)"):
        aggregate({"summary": {"radius": 0.1, "flat_tolerance": 0.1}}, AggregateInputs(inputs.store))


def test_resume_refuses_a_store_of_another_configuration(stage, tmp_path: Path) -> None:
    cfg, inputs = stage["cfg"], stage["inputs"]
    first = evaluate(cfg, inputs, LocalBackend())
    other = EvaluateInputs(inputs.checkpoint, inputs.directions, tmp_path / "b" / "landscape.zarr", "b" * 64)
    with pytest.raises(StoreError, match=rf"resume='{first.store}' was created for another configuration "
                       r"\(fingerprint 'a{64}', this run 'b{64}'\); refusing to mix results. Pass resume= the "
                       "store of this configuration, or drop resume= to start a fresh one"):
        evaluate(dataclasses.replace(cfg, resume=str(first.store)), other, LocalBackend())


def test_resume_of_a_missing_store(stage, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"resume='.*nowhere': no landscape store there .*drop resume= to start afresh"):
        evaluate(dataclasses.replace(stage["cfg"], resume=str(tmp_path / "nowhere")), stage["inputs"], LocalBackend())


def test_a_lost_done_mask_is_rebuilt_from_the_tile_records(stage) -> None:
    """Creation is atomic now (a killed creation leaves no store); a done mask lost later is
    rebuilt from the per-tile checksum records, so no finished tile is computed again."""
    cfg, inputs = stage["cfg"], stage["inputs"]
    evaluate(cfg, inputs, LocalBackend())
    before = LandscapeStore.open(inputs.store, mode="r").read("loss").copy()
    shutil.rmtree(inputs.store / "done")
    out = evaluate(cfg, inputs, LocalBackend())
    assert (out.tiles_computed, out.tiles_reused) == (0, N_TILES)
    np.testing.assert_array_equal(LandscapeStore.open(inputs.store, mode="r").read("loss"), before)


def test_a_failing_tile_keeps_the_finished_ones(stage) -> None:
    cfg, inputs = stage["cfg"], stage["inputs"]
    with pytest.raises(EvaluationError, match=r"evaluate: tile \(2, 0\) \(grid indices 2:3, 0:5\) failed: RuntimeError: "
                       r"boom after 17 calls. 4 tile\(s\) of this run are kept in .*; fix the cause and re-run the "
                       r"same command to resume \(14 tile\(s\) left\)"):
        evaluate(with_loss(cfg, ExplodeAfter, calls=17), inputs, LocalBackend())  # rows of 5 + 2 points
    assert LandscapeStore.open(inputs.store).done_mask().sum() == 4
    out = evaluate(cfg, inputs, LocalBackend())
    assert (out.tiles_reused, out.tiles_computed) == (4, 14)


def with_loss(cfg: PipelineConfig, cls: type, **kwargs: Any) -> PipelineConfig:
    metrics = dataclasses.replace(cfg.metrics, loss={"_target_": f"{__name__}.{cls.__name__}", **kwargs})
    return dataclasses.replace(cfg, metrics=metrics)


class ExplodeAfter(nn.Module):
    """Cross-entropy for ``calls`` calls (one per point on this path), then RuntimeError."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls, self.count = calls, 0
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.count > self.calls:
            raise RuntimeError(f"boom after {self.calls} calls")
        return self.ce(outputs, target)


@pytest.mark.parametrize("shape", [(2, 10), (1, 26122), (3, 26122)], ids=["other-model", "too-few", "too-many"])
def test_directions_of_the_wrong_shape(stage, tmp_path: Path, shape: tuple[int, int]) -> None:
    from pipelines.stages.directions import save_directions

    path = tmp_path / "wrong" / "directions.zarr"
    save_directions(path, np.ones(shape, dtype=np.float32), {})
    inputs = EvaluateInputs(stage["inputs"].checkpoint, path, tmp_path / "c" / "landscape.zarr", "c" * 64)
    with pytest.raises(ShapeMismatchError, match=rf"evaluate: the directions in .*directions\.zarr have shape "
                       rf"\({shape[0]}, {shape[1]}\), this run needs \(2, 26122\): one row per grid axis \(grid\.dims=2\) "
                       r"and one column per parameter of DemoMLP.*so that the directions stage makes them again"):
        evaluate(stage["cfg"], inputs, LocalBackend())
    assert not inputs.store.exists()  # refused before the store was made


def test_a_range_of_zero_length_is_refused(stage, tmp_path: Path) -> None:
    cfg = dataclasses.replace(stage["cfg"], grid=dataclasses.replace(stage["cfg"].grid, range=[[1.0, 1.0], [-0.5, 1.5]]))
    inputs = EvaluateInputs(stage["inputs"].checkpoint, stage["inputs"].directions, tmp_path / "z" / "landscape.zarr", "z" * 64)
    try:
        evaluate(cfg, inputs, LocalBackend())
    except ConfigurationError as err:
        assert re.search(r"grid\.range=\[1\.0, 1\.0\] \(axis 0\).*zero length", str(err)), str(err)
    else:
        raise AssertionError("9 copies of one coordinate were evaluated instead of refusing grid.range=[1.0, 1.0]")


def test_two_drivers_of_the_same_store_take_turns(stage) -> None:
    import fcntl
    import threading

    cfg, inputs = stage["cfg"], stage["inputs"]
    inputs.store.parent.mkdir(parents=True)
    results: list = []
    runs = [threading.Thread(target=lambda: results.append(evaluate(cfg, inputs, LocalBackend()))) for _ in range(2)]
    with open(inputs.store.parent / "landscape.zarr.lock", "a+") as held:  # as if a third run were evaluating
        fcntl.flock(held, fcntl.LOCK_EX)
        for run in runs:
            run.start()
        time.sleep(2)
        assert all(run.is_alive() for run in runs) and not inputs.store.exists()  # they wait, making nothing
        fcntl.flock(held, fcntl.LOCK_UN)
    for run in runs:
        run.join(timeout=60)
    assert sorted((r.tiles_computed, r.tiles_reused) for r in results) == [(0, N_TILES), (N_TILES, 0)]
