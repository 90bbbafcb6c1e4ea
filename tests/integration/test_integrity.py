"""Never a wrong landscape with exit 0: shared outputs are verified before reuse, damage is repaired.

Real parts: the pipeline in this process or as a CLI, a real sqlite tracking store, Zarr stores
on disk, damage done to them with the file system. Each damaged store is compared with the
store of the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from landscapes.store import LandscapeStore
from pipelines.verify import main as verify_main

from .conftest import Project

REPO = Path(__file__).resolve().parents[2]


def values(store: str | Path) -> dict[str, np.ndarray]:
    s = LandscapeStore.open(store, mode="r")
    return {m: s.read(m) for m in s.metrics}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for m in a:
        np.testing.assert_array_equal(a[m], b[m], err_msg=m)


@pytest.fixture
def finished(project: Project) -> dict:
    """One finished debug landscape and its values."""
    result = project.run("debug=default", "compute.max_batch_points=5")
    store = Path(result["store"])
    return {"project": project, "store": store, "values": values(store), "directions": Path(result["directions"])}


def _chunk(store: Path, metric: str = "loss") -> Path:
    chunks = sorted(p for p in (store / metric / "c").rglob("*") if p.is_file())
    assert chunks, f"no chunk files under {store / metric}"
    return chunks[len(chunks) // 2]


def _damage(kind: str, store: Path, directions: Path) -> str:
    """Damage the store; return a fragment that verify's report must name."""
    if kind == "delete-chunk":
        chunk = _chunk(store)
        chunk.unlink()
        return str(chunk.relative_to(store))
    if kind == "truncate-chunk":
        chunk = _chunk(store)
        chunk.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])
        return str(chunk.relative_to(store))
    if kind == "delete-done":
        import shutil

        shutil.rmtree(store / "done")
        return "done mask missing"
    if kind == "delete-directions-chunk":
        chunk = next(p for p in (directions / "c").rglob("*") if p.is_file())
        chunk.unlink()
        return str(directions)
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("kind", ["delete-chunk", "truncate-chunk", "delete-done", "delete-directions-chunk"])
def test_damage_is_reported_then_repaired(finished: dict, kind: str, reuse: bool, capsys) -> None:
    project, store, directions = finished["project"], finished["store"], finished["directions"]
    named = _damage(kind, store, directions)

    target = directions if kind == "delete-directions-chunk" else store
    assert verify_main([str(target)]) == 1  # verify reports the damage before any repair
    report = capsys.readouterr().out
    assert "DAMAGED" in report and named in report, report

    again = project.run("debug=default", "compute.max_batch_points=5", f"tracking.reuse={str(reuse).lower()}")
    assert Path(again["store"]) == store
    assert_same(values(store), finished["values"])  # equal to the uninterrupted run's landscape
    assert verify_main([str(store)]) == 0 and verify_main([str(directions)]) == 0
    capsys.readouterr()


def test_verify_repair_clears_the_damaged_tile(finished: dict, capsys) -> None:
    store = finished["store"]
    before = LandscapeStore.open(store, mode="r").done_mask().sum()
    _damage("delete-chunk", store, finished["directions"])
    assert verify_main([str(store), "--repair"]) == 0
    assert "(repaired)" in capsys.readouterr().out
    after = LandscapeStore.open(store, mode="r")
    assert after.done_mask().sum() == before - 1 and len(after.missing_tiles()) == 1


def test_a_changed_checkpoint_is_not_reused(project: Project) -> None:
    """Same path, other content: the checkpoint stage runs again and the landscape follows the file."""
    import shutil

    a, b = project.checkpoint(0), project.checkpoint(4)
    target = project.root / "mine.pt"
    shutil.copy(a, target)
    first = project.run("debug=default", f"checkpoint.path={target}")
    shutil.copy(b, target)
    second = project.run("debug=default", f"checkpoint.path={target}")
    assert second["store"] != first["store"]
    reference = project.run("debug=default", f"checkpoint.path={b}")
    assert_same(values(second["store"]), values(reference["store"]))


def test_stores_of_another_root_are_never_reused(project: Project, tmp_path: Path) -> None:
    """Two project roots on one tracking store: each makes its own stores."""
    first = project.run("debug=default")
    other = Project(root=tmp_path / "other", train_run_id=project.train_run_id)
    (other.root / "outputs").mkdir(parents=True)
    import shutil

    shutil.copytree(project.root / "outputs" / "demo", other.root / "outputs" / "demo")
    ckpt = project.checkpoint(4)
    mp = other.environment()
    try:
        from pipelines.pipeline import run_pipeline

        second = run_pipeline(other.compose("debug=default", f"checkpoint.path={ckpt}", f"tracking.uri={project.uri}"))
    finally:
        mp.undo()
    assert Path(second["store"]).is_relative_to(other.root)
    assert Path(first["store"]).is_relative_to(project.root)
    assert_same(values(second["store"]), values(first["store"]))


# --- demo training killed part way ------------------------------------------------------------


@pytest.mark.slow
def test_killed_demo_training_is_retrained_and_closed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LANDSCAPES_SWEEP_RUN_ID")}
    env["LANDSCAPES_ROOT"] = str(tmp_path)
    cmd = [sys.executable, "-m", "pipelines.run", "debug=default", "train.epochs=400", "train.checkpoint_every=10"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "outputs" / "demo" / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / "epoch_020.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (ckpts / "complete.json").exists()

    done = subprocess.run(cmd[:3] + ["debug=default", "train.epochs=40", "train.checkpoint_every=10"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    assert [r.info.status for r in runs if r.data.tags.get("landscapes.kind") == "train"].count("KILLED") == 1
    (pipeline,) = [r for r in runs if r.data.tags.get("landscapes.kind") == "pipeline"]
    assert pipeline.data.tags["landscapes.checkpoint"].endswith("epoch_040.pt")  # the fully trained model


# --- jobs racing for one directions store -----------------------------------------------------

LIMITS = (100, 110, 120, 130)


@pytest.mark.slow
def test_four_jobs_sharing_one_directions_key(tmp_path: Path, hydra_configs: None) -> None:
    """Four joblib jobs (one directions key, four data limits) started together, five times over."""
    import torch

    from pipelines.demo import DemoMLP

    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(DemoMLP().state_dict(), ckpt)
    serial = Project(root=tmp_path / "serial", train_run_id="")
    reference = {n: values(serial.run("debug=default", f"checkpoint.path={ckpt}", f"data.limit={n}")["store"])
                 for n in LIMITS}
    for n, ref in reference.items():
        assert ref["loss"].max() > ref["loss"].min(), f"data.limit={n}: a flat reference landscape"

    for trial in range(5):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LANDSCAPES_SWEEP_RUN_ID")}
        env["LANDSCAPES_ROOT"] = str(root)
        cmd = [sys.executable, "-m", "pipelines.run", "-m", "debug=default", f"checkpoint.path={ckpt}",
               f"data.limit={','.join(map(str, LIMITS))}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={len(LIMITS)}",
               "plot.enabled=false", "compare=false"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"trial {trial}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name("landscapes")
        runs = client.search_runs([exp.experiment_id], "tags.`landscapes.kind` = 'pipeline'")
        assert len(runs) == len(LIMITS) and {r.info.status for r in runs} == {"FINISHED"}, f"trial {trial}"
        for run in runs:
            n = int(run.data.params["data.limit"])
            got = values(run.data.tags["landscapes.store"])
            for m in got:
                np.testing.assert_allclose(got[m], reference[n][m], rtol=1e-6, atol=1e-9, err_msg=f"trial {trial}, {m}")
        assert len(list((root / "outputs" / "stores").glob("directions-*"))) == 1


# --- resume= keeps its word ----------------------------------------------------------------------


def test_resume_finishes_that_store_or_names_the_differing_keys(project: Project) -> None:
    """resume=<store> never silently reports another finished store (it used to reuse the default's)."""
    from landscapes.errors import StoreError
    from landscapes.store import verify_store

    project.run("debug=default")  # a finished store for the default configuration
    other = project.run("debug=default", "grid.steps=9", "compute.max_batch_points=9")
    store = Path(other["store"])
    _chunk(store).unlink()
    verify_store(store, repair=True)  # as if killed before that tile: one tile to do
    assert len(LandscapeStore.open(store, mode="r").missing_tiles()) == 1

    with pytest.raises(StoreError, match=r"created for another configuration .*differing: grid\.steps: store 9, this run 5"):
        project.run("debug=default", f"resume={store}")
    resumed = project.run("debug=default", "grid.steps=9", "compute.max_batch_points=9", f"resume={store}")
    assert Path(resumed["store"]) == store and LandscapeStore.open(store, mode="r").is_complete()
    runs = project.stages(resumed["run_id"])
    assert runs["evaluate"].data.metrics["tiles_computed"] == 1
