"""Real pipeline fixtures: the demo trained once, then a private copy of it per test.

Creating an MLflow sqlite database takes seconds (alembic migrations) and training the demo
a few more, so the session trains once into a template project root (``mlflow.db``,
``mlartifacts/``, ``outputs/demo/checkpoints/``) and each test that needs its own store gets
a copy, with the artifact locations inside the copied database pointed at the copy.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from pipelines.config import PipelineConfig, register_configs, to_typed
from pipelines.training import TrainResult, train

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
EXPERIMENT = "landscapes"


@dataclass(frozen=True)
class DemoTemplate:
    """The project root the demo was trained into, and the training run."""

    root: Path
    train: TrainResult


@dataclass
class Project:
    """A private project root (``LANDSCAPES_ROOT``) with its own MLflow store and checkpoints."""

    root: Path
    train_run_id: str
    _runs: int = field(default=0, repr=False)

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def checkpoint(self, epoch: int) -> Path:
        return self.root / "outputs" / "demo" / "checkpoints" / f"epoch_{epoch:03d}.pt"

    def env(self) -> dict[str, str]:
        """The environment of a CLI subprocess working in this project."""
        scrub = ("MLFLOW_TRACKING_URI", "LANDSCAPES_SWEEP_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                 "MLFLOW_RUN_ID")  # another test's run or experiment must not leak into this project's commands
        env = {k: v for k, v in os.environ.items() if k not in scrub}
        env["LANDSCAPES_ROOT"] = str(self.root)
        return env

    def compose(self, *overrides: str) -> DictConfig:
        """``conf/config.yaml`` composed with ``overrides``; ``paths.output_dir`` in this root.

        ``LANDSCAPES_ROOT`` must stay set while the config is resolved (interpolations are
        lazy), so use it inside `Project.run` or `Project.environment`.
        """
        self._runs += 1
        out = self.root / "outputs" / "runs" / str(self._runs)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"paths.output_dir={out}", *overrides])

    def environment(self) -> pytest.MonkeyPatch:
        mp = pytest.MonkeyPatch()
        mp.setenv("LANDSCAPES_ROOT", str(self.root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("LANDSCAPES_SWEEP_RUN_ID", raising=False)
        return mp

    def resolved(self, *overrides: str) -> PipelineConfig:
        """The composed config as the schema's typed objects (what the stages receive)."""
        mp = self.environment()
        try:
            return to_typed(self.compose(*overrides))
        finally:
            mp.undo()

    def run(self, *overrides: str, stages: tuple | None = None) -> dict[str, Any]:
        """Compose and run the pipeline (``stages``: another stage table) in this process."""
        from pipelines.pipeline import STAGES, run_pipeline

        mp = self.environment()
        previous = mlflow.get_tracking_uri()
        try:
            return run_pipeline(self.compose(*overrides), stages=stages or STAGES)
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(previous)
            mp.undo()

    def cli(self, module: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m <module> <args>`` in the repository, with this project's environment."""
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, env=self.env(), capture_output=True,
            text=True, timeout=timeout,
        )
        assert proc.returncode == 0 or not check, f"{module} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    # --- MLflow queries ---------------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        assert exp is not None
        return exp.experiment_id

    def search(self, filter_string: str = "") -> list[Run]:
        return self.client.search_runs([self.experiment_id], filter_string, order_by=["attributes.start_time ASC"])

    def children(self, parent_run_id: str, kind: str | None = None) -> list[Run]:
        clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
        if kind:
            clauses.append(f"tags.`landscapes.kind` = '{kind}'")
        return self.search(" and ".join(clauses))

    def stages(self, parent_run_id: str) -> dict[str, Run]:
        """The stage runs opened under a pipeline run, by stage name."""
        runs = self.children(parent_run_id, "stage")
        by_name = {r.data.tags["landscapes.stage"]: r for r in runs}
        assert len(by_name) == len(runs), f"two stage runs of one name under {parent_run_id}"
        return by_name

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        return sorted(f.path for f in self.client.list_artifacts(run_id, path))


def _repoint(db: Path, old: Path, new: Path) -> None:
    """Point the artifact locations stored in a copied database at the copy's folder."""
    con = sqlite3.connect(db)
    try:
        with con:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(old), str(new)))
    finally:
        con.close()


@pytest.fixture(scope="session")
def hydra_configs() -> None:
    """The structured-config schema (``base_config``) registered for compose()."""
    register_configs()


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoTemplate]:
    """The demo model trained once (4 epochs, checkpoints at 0, 2, 4) into a template root."""
    root = tmp_path_factory.mktemp("demo-template")
    previous = mlflow.get_tracking_uri()
    result = train({
        "out_dir": root / "outputs" / "demo", "epochs": 4, "checkpoint_every": 2,
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": EXPERIMENT,
    })
    mlflow.set_tracking_uri(previous)
    yield DemoTemplate(root=root, train=result)


def copy_project(template: DemoTemplate, dest: Path) -> Project:
    """A copy of the template root at ``dest`` with its own store and artifacts."""
    shutil.copytree(template.root, dest, ignore=shutil.ignore_patterns("*.lock"))
    _repoint(dest / "mlflow.db", template.root, dest)
    return Project(root=dest, train_run_id=template.train.run_id)


@pytest.fixture
def project(demo_template: DemoTemplate, hydra_configs: None, tmp_path: Path) -> Project:
    """This test's own project root: trained demo checkpoints, a store with the training run."""
    return copy_project(demo_template, tmp_path / "root")


@pytest.fixture(scope="module")
def module_project(demo_template: DemoTemplate, hydra_configs: None, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """One project root shared by a module's tests (for runs that are expensive to repeat)."""
    return copy_project(demo_template, tmp_path_factory.mktemp("module") / "root")
