"""``mlflow run . -e main``: the pipeline run and its stage runs land in one experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Project

MLFLOW = Path(sys.executable).with_name("mlflow")


def _mlflow_run(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {**project.env(), **(env or {}), "MLFLOW_TRACKING_URI": project.uri,
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(MLFLOW), "run", str(REPO), "-e", "main", "--env-manager", "local",
         "-P", f"checkpoint={project.checkpoint(4)}", "-P", "overrides=debug=default", *args],
        cwd=project.root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mlflow run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _runs_of_launch(project: Project) -> tuple[list, list]:
    """Every pipeline run and stage run in the store, whatever the experiment."""
    client = project.client
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, "tags.`landscapes.kind` != 'training'")
    pipelines = [r for r in runs if r.data.tags.get("landscapes.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("landscapes.kind") == "stage"]
    return pipelines, stages


def _assert_one_experiment(project: Project, experiment: str) -> None:
    pipelines, stages = _runs_of_launch(project)
    assert len(pipelines) == 1, [r.info.run_name for r in pipelines]
    (parent,) = pipelines
    assert {r.data.tags["landscapes.stage"] for r in stages} == {"checkpoint", "directions", "evaluate", "aggregate",
                                                                  "report"}
    exp = project.client.get_experiment(parent.info.experiment_id)
    assert exp.name == experiment
    assert {r.info.experiment_id for r in stages} == {parent.info.experiment_id}
    assert {r.data.tags.get("mlflow.parentRunId") for r in stages} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert "loss_at_theta0" in parent.data.metrics


@pytest.mark.slow
def test_mlflow_run_main_keeps_every_run_in_its_experiment(project: Project) -> None:
    _mlflow_run(project, "--experiment-name", "landscapes")
    _assert_one_experiment(project, "landscapes")


@pytest.mark.slow
def test_mlflow_run_main_follows_another_experiment(project: Project) -> None:
    """--experiment-name other: the stages follow the run MLflow opened, not tracking.experiment."""
    _mlflow_run(project, "--experiment-name", "other")
    _assert_one_experiment(project, "other")
