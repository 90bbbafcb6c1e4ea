"""MLflow wiring on a real sqlite store: parent and child runs, stage reuse, failures, races."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from landscapes.errors import ConfigurationError
from pipelines import tracking

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly migrated store, made once: creating one takes seconds (alembic migrations)."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.ensure_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(tmp_path: Path, template_db: Path):
    """This test's own store (a copy of the template), set as the tracking URI."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    previous = mlflow.get_tracking_uri()
    uri = tracking.configure(f"sqlite:///{db}")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def experiment_id(store: str, tmp_path: Path) -> str:
    return tracking.get_or_create_experiment("test", artifact_root=tmp_path / "artifacts")


# --- a toy stage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    scale: float
    label: str = "toy"


@dataclass(frozen=True)
class ToyInputs:
    out_dir: Path


@dataclass(frozen=True)
class ToyMetrics:
    loss: float
    accuracy: float


@dataclass(frozen=True)
class ToyOutputs:
    values: Path
    n: int
    metrics: ToyMetrics
    artifacts: tuple[Path, ...]
    note: str | None = None


class ToyStage:
    """Counts its calls; writes a file and a folder of plots."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cfg: ToyConfig, inputs: ToyInputs) -> ToyOutputs:
        self.calls += 1
        inputs.out_dir.mkdir(parents=True, exist_ok=True)
        values = inputs.out_dir / "values.txt"
        values.write_text(f"{cfg.scale}\n")
        plots = inputs.out_dir / "plots"
        plots.mkdir(exist_ok=True)
        (plots / "surface.html").write_text("<html></html>")
        return ToyOutputs(
            values=values,
            n=3,
            metrics=ToyMetrics(loss=0.25 * cfg.scale, accuracy=0.5),
            artifacts=(values, plots),
        )


def _run(stage, cfg, tmp_path, *, parent, experiment_id, key, name="directions", **kw):
    return tracking.run_stage(
        name,
        stage,
        cfg,
        ToyInputs(out_dir=tmp_path / name),
        parent_run_id=parent,
        experiment_id=experiment_id,
        key=key,
        params=dataclasses.asdict(cfg),
        outputs_type=ToyOutputs,
        **kw,
    )


# --- store and experiments -----------------------------------------------------------------


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri(Path(".")) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking.default_tracking_uri(tmp_path) == "sqlite:////elsewhere/mlflow.db"


def test_relative_sqlite_uri_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"relative sqlite path.*sqlite:////abs/path"):
        tracking.ensure_store("sqlite:///mlflow.db")


def test_experiment_artifacts_are_absolute(
    experiment_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "artifacts" / "test").as_uri()
    assert tracking.get_or_create_experiment("test", artifact_root=Path("x")) == experiment_id
    elsewhere = tmp_path / "hydra-job-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "a.txt").write_text("a")
    with tracking.start_pipeline_run(experiment_id, "p") as run:
        tracking.log_artifact(elsewhere / "a.txt", "files")
    stored = tmp_path / "artifacts" / "test" / run.info.run_id / "artifacts" / "files" / "a.txt"
    assert stored.read_text() == "a"
    assert not (elsewhere / "mlruns").exists()


def test_deleted_experiment(store: str, tmp_path: Path) -> None:
    exp = tracking.get_or_create_experiment("gone", artifact_root=tmp_path)
    MlflowClient().delete_experiment(exp)
    with pytest.raises(ConfigurationError, match=r"experiment 'gone' .* is deleted; restore it"):
        tracking.get_or_create_experiment("gone", artifact_root=tmp_path)


# --- keys and params -----------------------------------------------------------------------


def test_stage_key() -> None:
    base = tracking.stage_key("evaluate", {"a": 1, "b": {"c": [1, 2]}}, ["k1"], "0.1.0")
    assert base == tracking.stage_key("evaluate", {"b": {"c": [1, 2]}, "a": 1}, ["k1"], "0.1.0")
    assert base == tracking.stage_key("evaluate", {"a": 1, "b": {"c": (1, 2)}}, ("k1",), "0.1.0")
    others = [
        tracking.stage_key("evaluate", {"a": 2, "b": {"c": [1, 2]}}, ["k1"], "0.1.0"),
        tracking.stage_key("evaluate", {"a": 1, "b": {"c": [1, 2]}}, ["k2"], "0.1.0"),
        tracking.stage_key("evaluate", {"a": 1, "b": {"c": [1, 2]}}, ["k1"], "0.2.0"),
        tracking.stage_key("report", {"a": 1, "b": {"c": [1, 2]}}, ["k1"], "0.1.0"),
    ]
    assert len({base, *others}) == 5
    assert tracking.stage_key("s", ToyConfig(scale=1.0), [], "v") == tracking.stage_key(
        "s", {"scale": 1.0, "label": "toy"}, [], "v"
    )
    with pytest.raises(ConfigurationError, match=r"s config\.fn: value .* has no JSON form"):
        tracking.stage_key("s", {"fn": object()}, [], "v")


def test_flatten_params() -> None:
    flat = tracking.flatten_params(
        {"grid": {"x": {"num": 41, "range": [-1.0, 1.0]}}, "path": Path("/a/b"), "long": "x" * 7000}
    )
    assert flat["grid.x.num"] == "41"
    assert flat["grid.x.range"] == "[-1.0,1.0]"
    assert flat["path"] == "/a/b"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_find_finished_stage_rejects_odd_keys(experiment_id: str) -> None:
    with pytest.raises(ConfigurationError, match="must be a hex digest"):
        tracking.find_finished_stage(experiment_id, "x' OR '1'='1")


# --- stages --------------------------------------------------------------------------------


def test_parent_with_two_children(experiment_id: str, tmp_path: Path) -> None:
    stage = ToyStage()
    k1 = tracking.stage_key("directions", {"scale": 1.0}, [], "0")
    k2 = tracking.stage_key("evaluate", {"scale": 2.0}, [k1], "0")
    with tracking.start_pipeline_run(experiment_id, "pipeline", {"landscapes.sweep": "s"}) as run:
        parent = run.info.run_id
        out1 = _run(
            stage, ToyConfig(1.0), tmp_path, parent=parent, experiment_id=experiment_id, key=k1
        )
        out2 = _run(
            stage,
            ToyConfig(2.0),
            tmp_path,
            parent=parent,
            experiment_id=experiment_id,
            key=k2,
            name="evaluate",
        )
    assert stage.calls == 2
    assert out1.metrics.loss == 0.25 and out2.metrics.loss == 0.5

    frame = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(frame["tags.mlflow.runName"]) == ["directions", "evaluate"]
    assert set(frame["status"]) == {"FINISHED"}
    by_name = frame.set_index("tags.mlflow.runName")
    assert by_name.loc["directions", "params.scale"] == "1.0"
    assert by_name.loc["evaluate", "params.label"] == "toy"
    assert by_name.loc["evaluate", "metrics.loss"] == 0.5
    assert by_name.loc["directions", f"tags.{tracking.TAG_STAGE_KEY}"] == k1
    assert by_name.loc["directions", f"tags.{tracking.TAG_KIND}"] == "stage"
    assert by_name.loc["evaluate", f"tags.{tracking.TAG_STAGE}"] == "evaluate"

    client = MlflowClient()
    child = by_name.loc["directions", "run_id"]
    names = {a.path for a in client.list_artifacts(child)}
    assert names == {"outputs.json", "values.txt", "plots"}
    assert [a.path for a in client.list_artifacts(child, "plots")] == ["plots/surface.html"]

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags[tracking.TAG_KIND] == "pipeline"
    assert parent_run.data.tags["landscapes.sweep"] == "s"
    assert parent_run.data.tags[f"{tracking.TAG_PARENT_STAGE_PREFIX}directions"] == child


def test_metrics_logged_under_their_names(experiment_id: str, tmp_path: Path) -> None:
    key = tracking.stage_key("directions", {}, [], "0")
    with tracking.start_pipeline_run(experiment_id, "p") as run:
        _run(
            ToyStage(),
            ToyConfig(4.0),
            tmp_path,
            parent=run.info.run_id,
            experiment_id=experiment_id,
            key=key,
        )
    child = tracking.find_finished_stage(experiment_id, key)
    assert child is not None
    assert child.data.metrics == {"loss": 1.0, "accuracy": 0.5}


def test_second_run_reuses_finished_stage(experiment_id: str, tmp_path: Path) -> None:
    stage = ToyStage()
    key = tracking.stage_key("directions", {"scale": 3.0}, [], "0")
    with tracking.start_pipeline_run(experiment_id, "first") as run:
        first = _run(
            stage,
            ToyConfig(3.0),
            tmp_path,
            parent=run.info.run_id,
            experiment_id=experiment_id,
            key=key,
        )
    with tracking.start_pipeline_run(experiment_id, "second") as run:
        second_parent = run.info.run_id
        again = _run(
            stage,
            ToyConfig(3.0),
            tmp_path,
            parent=second_parent,
            experiment_id=experiment_id,
            key=key,
        )
    assert stage.calls == 1
    assert again == first
    assert isinstance(again.values, Path) and isinstance(again.metrics, ToyMetrics)
    assert isinstance(again.artifacts, tuple) and all(isinstance(p, Path) for p in again.artifacts)
    reused = tracking.find_finished_stage(experiment_id, key)
    tags = MlflowClient().get_run(second_parent).data.tags
    assert tags[f"{tracking.TAG_PARENT_STAGE_PREFIX}directions"] == reused.info.run_id

    with tracking.start_pipeline_run(experiment_id, "forced") as run:
        _run(
            stage,
            ToyConfig(3.0),
            tmp_path,
            parent=run.info.run_id,
            experiment_id=experiment_id,
            key=key,
            reuse=False,
        )
    assert stage.calls == 2


def test_reuse_skipped_when_outputs_were_deleted(experiment_id: str, tmp_path: Path) -> None:
    stage = ToyStage()
    key = tracking.stage_key("directions", {"scale": 5.0}, [], "0")
    first = _run(stage, ToyConfig(5.0), tmp_path, parent=None, experiment_id=experiment_id, key=key)
    first.values.unlink()
    _run(stage, ToyConfig(5.0), tmp_path, parent=None, experiment_id=experiment_id, key=key)
    assert stage.calls == 2


def test_failing_stage_leaves_failed_child(experiment_id: str, tmp_path: Path) -> None:
    calls = []

    def broken(cfg: ToyConfig, inputs: ToyInputs) -> ToyOutputs:
        calls.append(cfg)
        raise RuntimeError("boom in the stage")

    key = tracking.stage_key("evaluate", {"scale": 1.0}, [], "0")
    with tracking.start_pipeline_run(experiment_id, "pipeline") as run:
        parent = run.info.run_id
        for _ in range(2):
            with pytest.raises(RuntimeError, match="boom in the stage"):
                _run(
                    broken,
                    ToyConfig(1.0),
                    tmp_path,
                    parent=parent,
                    experiment_id=experiment_id,
                    key=key,
                    name="evaluate",
                )
        assert mlflow.active_run().info.run_id == parent
    assert len(calls) == 2  # a failed run is never reused
    children = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        output_format="list",
    )
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert all(tracking.TAG_STAGE_KEY not in c.data.tags for c in children)
    assert tracking.find_finished_stage(experiment_id, key) is None


def test_wrong_outputs_type(experiment_id: str, tmp_path: Path) -> None:
    key = tracking.stage_key("evaluate", {}, [], "0")
    with pytest.raises(
        ConfigurationError, match=r"stage 'evaluate': .* returned dict, expected ToyOutputs"
    ):
        _run(
            lambda cfg, inputs: {"n": 1},
            ToyConfig(1.0),
            tmp_path,
            parent=None,
            experiment_id=experiment_id,
            key=key,
            name="evaluate",
        )
    (failed,) = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    assert failed.info.status == "FAILED"


def test_outputs_type_from_annotation(experiment_id: str, tmp_path: Path) -> None:
    stage = ToyStage()

    def annotated(cfg: ToyConfig, inputs: ToyInputs) -> ToyOutputs:
        return stage(cfg, inputs)

    key = tracking.stage_key("directions", {"annotated": True}, [], "0")
    for _ in range(2):
        out = tracking.run_stage(
            "directions",
            annotated,
            ToyConfig(1.0),
            ToyInputs(tmp_path),
            parent_run_id=None,
            experiment_id=experiment_id,
            key=key,
        )
    assert stage.calls == 1 and isinstance(out, ToyOutputs)


# --- concurrency ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ensure_store_from_four_processes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from pipelines import tracking
        tracking.configure({uri!r})
        print(tracking.get_or_create_experiment("shared", artifact_root=Path({str(tmp_path)!r})))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1
    client = MlflowClient(uri)
    names = {e.name for e in client.search_experiments()}
    assert names == {"Default", "shared"}
    run = client.create_run(ids.pop())
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
