"""Eight pipeline jobs at once on one sqlite tracking store (Hydra's joblib launcher).

The sweep callback creates the database and the sweep's parent run before any job starts; then
eight processes write their runs concurrently. None may be lost or fail ("database is locked").
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.demo import DemoMLP

REPO = Path(__file__).resolve().parents[2]
STAGES = {"checkpoint", "directions", "evaluate", "aggregate", "report"}
JOBS = 8


@pytest.mark.slow
def test_eight_parallel_jobs_share_one_sqlite_store(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(DemoMLP().state_dict(), ckpt)
    seeds = ",".join(str(s) for s in range(JOBS))
    cmd = [
        sys.executable, "-m", "pipelines.run", "-m", "debug=default", f"checkpoint.path={ckpt}",
        f"directions.seed={seeds}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={JOBS}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["LANDSCAPES_ROOT"] = str(tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "database is locked" not in proc.stdout + proc.stderr, log

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("landscapes")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    by_id = {r.info.run_id: r for r in runs}
    kinds = Counter(r.data.tags.get("landscapes.kind") for r in runs)
    sweeps = [r for r in runs if r.data.tags.get("landscapes.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED", kinds
    pipelines = [r for r in runs if r.data.tags.get("landscapes.kind") == "pipeline"]
    assert len(pipelines) == JOBS, kinds
    assert {r.info.status for r in pipelines} == {"FINISHED"}
    assert {r.data.tags.get("mlflow.parentRunId") for r in pipelines} == {sweeps[0].info.run_id}
    assert not [r for r in runs if r.info.status != "FINISHED"], "a run failed or was left RUNNING"
    # one folder per job, named by number and checkpoint (the same checkpoint: the number keeps them apart)
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "compare") == sorted(
        f"{i}_mlp" for i in range(JOBS))

    seeds_seen = set()
    for p in pipelines:
        # each stage's run: its own child, or a finished run with the same key that it reused
        linked = {k.removeprefix("landscapes.stage_run."): v for k, v in p.data.tags.items()
                  if k.startswith("landscapes.stage_run.")}
        assert set(linked) == STAGES, p.data.tags
        for stage, run_id in linked.items():
            assert by_id[run_id].data.tags["landscapes.stage"] == stage
            assert by_id[run_id].info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        own = {r.data.tags["landscapes.stage"] for r in children}
        assert own | {s for s, rid in linked.items() if by_id[rid].data.tags.get("mlflow.parentRunId") != p.info.run_id} == STAGES
        assert STAGES - {"checkpoint"} <= own  # only the shared checkpoint stage may be reused
        assert "loss_at_theta0" in p.data.metrics
        seeds_seen.add(by_id[linked["directions"]].data.params["directions.seed"])
    assert seeds_seen == {str(s) for s in range(JOBS)}
    assert sum(1 for r in runs if r.data.tags.get("landscapes.stage") == "evaluate") == JOBS
