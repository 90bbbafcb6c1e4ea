"""A two-checkpoint sweep through the real CLI, and the compare CLI on its runs.

``python -m pipelines.run -m ...`` runs in a subprocess (Hydra's multirun, the sweep callback
and the compare stage only exist there) against a private copy of the demo project.
"""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run

from tests.integration.conftest import Project

pytestmark = pytest.mark.slow

STAGES = ["aggregate", "checkpoint", "directions", "evaluate", "report"]


def summary_rows(project: Project, run: Run, dest: Path) -> list[dict[str, str]]:
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="summary.csv", dst_path=str(dest), tracking_uri=project.uri
    )
    with open(local, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(module_project: Project) -> tuple[Project, Run, list[Run]]:
    """The sweep over epochs 2 and 4: (project, sweep parent run, its pipeline runs)."""
    project = module_project
    a, b = project.checkpoint(2), project.checkpoint(4)
    proc = project.cli("pipelines.run", "-m", "debug=default", f"checkpoint.path={a},{b}")
    assert "compared 2 landscapes" in proc.stdout
    sweeps = project.search("tags.`landscapes.kind` = 'sweep'")
    assert len(sweeps) == 1
    return project, sweeps[0], project.children(sweeps[0].info.run_id, "pipeline")


def test_sweep_parent_and_pipeline_children(sweep) -> None:
    project, parent, runs = sweep
    assert parent.info.status == "FINISHED"
    sweep_dir = Path(parent.data.tags["landscapes.sweep_dir"])
    assert sweep_dir.is_relative_to(project.root / "outputs" / "sweeps")
    assert (sweep_dir / "sweep_run_id").read_text().strip() == parent.info.run_id
    # job folders are named by number and checkpoint, each with its plots and Hydra's record of its overrides
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "compare")
    assert jobs == ["0_epoch_002", "1_epoch_004"]
    for job in jobs:
        assert list((sweep_dir / job / "plots").glob("loss_contour*.png")), job
        assert f"{job[2:]}.pt" in (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()

    assert len(runs) == 2
    assert sorted(Path(r.data.tags["landscapes.checkpoint"]).name for r in runs) == ["epoch_002.pt", "epoch_004.pt"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["landscapes.training_run"] == project.train_run_id
        stages = project.stages(run.info.run_id)
        assert sorted(stages) == STAGES
        assert all(s.info.status == "FINISHED" for s in stages.values())
        assert Path(run.data.tags["landscapes.store"]).exists()
    # different checkpoints: different landscapes
    assert runs[0].data.tags["landscapes.store"] != runs[1].data.tags["landscapes.store"]
    assert runs[0].data.metrics["loss_at_theta0"] != runs[1].data.metrics["loss_at_theta0"]


def test_sweep_ends_with_compare_run(sweep, tmp_path: Path) -> None:
    project, parent, runs = sweep
    compares = project.children(parent.info.run_id, "compare")
    assert len(compares) == 1
    compare = compares[0]
    assert compare.info.status == "FINISHED"
    ids = {r.info.run_id for r in runs}
    assert set(compare.data.tags["landscapes.compared_runs"].split(",")) == ids
    assert compare.data.params["runs"] == "2"

    files = project.artifacts(compare.info.run_id)
    pngs = [f for f in files if f.endswith(".png")]
    assert any(f.startswith("loss") and "comparison" in f for f in pngs), files
    assert any(f.startswith("accuracy") and "comparison" in f for f in pngs), files
    # epochs 2 and 4 have their own θ0 and directions: two planes, so no difference map, and a note says why
    assert not any("difference" in f for f in pngs), files
    assert "difference maps need one shared plane" in compare.data.tags["landscapes.compare_notes"]
    assert "summary.csv" in files and "summary.md" in files

    rows = summary_rows(project, compare, tmp_path)
    assert {row["run_id"] for row in rows} == ids
    by_id = {r.info.run_id: r for r in runs}
    for row in rows:
        assert float(row["loss_at_theta0"]) == pytest.approx(by_id[row["run_id"]].data.metrics["loss_at_theta0"])
    assert sorted(row["landscape"] for row in rows) == ["epoch_002", "epoch_004"]

    # the sweep's own run carries the comparison: the same plots and table, under comparison/
    assert parent.data.tags["landscapes.compare_run"] == compare.info.run_id
    on_sweep = project.artifacts(parent.info.run_id, "comparison")
    assert on_sweep == [f"comparison/{f}" for f in files]
    with open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="comparison/summary.csv",
                                                  dst_path=str(tmp_path / "sweep"), tracking_uri=project.uri),
              newline="") as fh:
        assert list(csv.DictReader(fh)) == rows


def test_compare_cli(sweep, tmp_path: Path) -> None:
    project, parent, runs = sweep
    ids = [r.info.run_id for r in runs]
    before = {r.info.run_id for r in project.search("tags.`landscapes.kind` = 'compare'")}
    out = tmp_path / "compare"
    proc = project.cli("pipelines.compare", "--runs", *ids, "--tracking-uri", project.uri, "--out", str(out))
    assert "compared 2 landscapes" in proc.stdout

    new = [r for r in project.search("tags.`landscapes.kind` = 'compare'") if r.info.run_id not in before]
    assert len(new) == 1
    compare = new[0]
    assert compare.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in compare.data.tags  # not part of the sweep
    assert compare.data.tags["landscapes.compared_runs"] == ",".join(ids)
    assert (out / "summary.csv").exists()
    assert any(p.name.startswith("loss") and "comparison" in p.name for p in out.glob("*.png"))
    assert {row["run_id"] for row in summary_rows(project, compare, tmp_path / "dl")} == set(ids)


def test_a_failed_job_fails_the_sweep_parent(project: Project) -> None:
    """Hydra stops a sweep at a failed job without on_multirun_end: the parent must not stay RUNNING."""
    good, missing = project.checkpoint(2), project.root / "no_such_checkpoint.pt"
    proc = project.cli("pipelines.run", "-m", "debug=default", f"checkpoint.path={good},{missing}", check=False)
    assert proc.returncode != 0
    assert "no_such_checkpoint.pt" in proc.stderr
    (parent,) = project.search("tags.`landscapes.kind` = 'sweep'")
    assert parent.info.status == "FAILED"
    failed = parent.data.tags["landscapes.failed_job"]
    assert "no_such_checkpoint.pt" in failed and "CheckpointNotFoundError" in failed
    runs = project.children(parent.info.run_id, "pipeline")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert [Path(r.data.tags["landscapes.checkpoint"]).name for r in finished] == ["epoch_002.pt"]


def test_runs_are_named_and_charted_against_the_epoch(sweep) -> None:
    """Each pipeline run says what it is; the sweep charts loss at θ0 against the checkpoints' epochs."""
    project, parent, runs = sweep
    names = sorted(r.info.run_name for r in runs)
    assert names == ["epoch_002 · plane 5² filter s0", "epoch_004 · plane 5² filter s0"]
    assert sorted(r.data.params["epoch"] for r in runs) == ["2", "4"]
    history = project.client.get_metric_history(parent.info.run_id, "loss_at_theta0")
    by_epoch = {m.step: m.value for m in history}
    assert sorted(by_epoch) == [2, 4]
    for run in runs:
        assert by_epoch[int(run.data.params["epoch"])] == run.data.metrics["loss_at_theta0"]


def test_the_sweep_and_its_runs_describe_themselves(sweep) -> None:
    """The sweep is named by what it sweeps; its description lists the values, each pipeline run its figures."""
    project, parent, runs = sweep
    assert parent.info.run_name == "sweep checkpoint.path ×2"
    sweep_dir = parent.data.tags["landscapes.sweep_dir"]
    assert parent.data.tags["mlflow.note.content"].splitlines() == [
        f"Sweeps **checkpoint.path** (2 jobs), started {Path(sweep_dir).name}:",
        "- checkpoint.path: epoch_002, epoch_004",
        "- fixed: debug=default",
        f"- jobs in `{sweep_dir}`; the comparison in `{sweep_dir}/compare` and in this run's artifacts, `comparison/`",
    ]
    for run in runs:
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"**{Path(run.data.tags['landscapes.checkpoint']).stem}** on digits: "
                               f"loss at θ0 **{run.data.metrics['loss_at_theta0']:.4g}**"), note
        assert f"- store: `{run.data.tags['landscapes.store']}`" in note
