"""The compare stage on real pipeline runs: grouping by grid kind and plane, dedupe, errors.

Five debug runs in one project: a random plane around epoch 2, one around epoch 4, the epoch-4
plane again on fewer samples (same directions and θ0: same plane, another store), the epoch-4
run repeated (reused: same store) and a line from epoch 0 to epoch 4.
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run

from landscapes import plots
from landscapes.errors import ConfigurationError
from pipelines.comparison import compare, dedupe_by_store, pipeline_runs
from tests.integration.conftest import Project

pytestmark = pytest.mark.slow  # five pipeline runs: ~40 s


@dataclass(frozen=True)
class Runs:
    project: Project
    plane2: Run  # random plane around epoch 2
    plane4: Run  # random plane around epoch 4
    plane4_small: Run  # the same plane, data.limit=64: another store
    plane4_again: Run  # plane4 repeated: the same store
    line: Run  # epoch 0 → epoch 4

    @property
    def all(self) -> list[Run]:
        return [self.plane2, self.plane4, self.plane4_small, self.plane4_again, self.line]


@pytest.fixture(scope="module")
def runs(module_project: Project) -> Iterator[Runs]:
    p = module_project
    ck = p.checkpoint

    def run(*overrides: str) -> Run:
        return p.client.get_run(p.run("debug=default", *overrides)["run_id"])

    made = Runs(
        p,
        run(f"checkpoint.path={ck(2)}"),
        run(f"checkpoint.path={ck(4)}"),
        run(f"checkpoint.path={ck(4)}", "data.limit=64"),
        run(f"checkpoint.path={ck(4)}"),
        run("experiment=1d_interpolation", f"checkpoint.path={ck(0)}", f"directions.towards=[{ck(4)}]", "grid.steps=9"),
    )
    yield made


@pytest.fixture
def tracking_at(runs: Runs) -> Iterator[Project]:
    """The global tracking URI (what compare() logs to) at the project's store."""
    mp = runs.project.environment()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(runs.project.uri)
    try:
        yield runs.project
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)
        mp.undo()


def _scale(png: Path) -> dict:
    """The comparison PNG's ``landscapes:color_scale`` text chunk."""
    data, pos = png.read_bytes(), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and body.startswith(plots.COLOR_SCALE_KEY.encode() + b"\0"):
            return json.loads(body.partition(b"\0")[2])
        pos += 12 + length
    raise AssertionError(f"no {plots.COLOR_SCALE_KEY} in {png}")


def test_setup_is_what_the_tests_assume(runs: Runs) -> None:
    tag = lambda r, k: r.data.tags[k]  # noqa: E731
    assert tag(runs.plane4_again, "landscapes.store") == tag(runs.plane4, "landscapes.store")
    assert tag(runs.plane4_small, "landscapes.store") != tag(runs.plane4, "landscapes.store")
    assert tag(runs.plane4_small, "landscapes.directions") == tag(runs.plane4, "landscapes.directions")
    assert tag(runs.plane2, "landscapes.directions") != tag(runs.plane4, "landscapes.directions")
    assert tag(runs.line, "landscapes.grid") == "9"


def test_groups_by_kind_and_plane_and_dedupes_by_store(runs: Runs, tracking_at: Project, tmp_path: Path) -> None:
    project = tracking_at
    selected = pipeline_runs(experiment_id=project.experiment_id)
    assert {r.info.run_id for r in selected} == {r.info.run_id for r in runs.all}
    kept, dupes = dedupe_by_store(selected)
    assert [r.info.run_id for r in dupes] == [runs.plane4_again.info.run_id]

    out = tmp_path / "cmp"
    result = compare(selected, out_dir=out, experiment_id=project.experiment_id, plotlyjs="directory")
    assert set(result.run_ids) == {r.info.run_id for r in (runs.plane2, runs.plane4, runs.plane4_small, runs.line)}
    assert result.duplicates == (runs.plane4_again.info.run_id,)

    planes, lines = out / "planes", out / "lines"
    assert sorted(p.name for p in planes.iterdir()) == [
        "accuracy_comparison.html", "accuracy_comparison.png", "accuracy_difference.png",
        "loss_log_comparison.html", "loss_log_comparison.png", "loss_log_difference.png", "plotly.min.js",
    ]
    # lines are overlaid, never subtracted; no difference map there
    assert sorted(p.name for p in lines.iterdir()) == [
        "accuracy_comparison.html", "accuracy_comparison.png", "loss_log_comparison.html",
        "loss_log_comparison.png", "plotly.min.js",
    ]
    assert _scale(planes / "loss_log_comparison.png")["planes"] == 2  # epoch 2's plane, epoch 4's plane
    for html in [*planes.glob("*.html"), *lines.glob("*.html")]:
        assert html.stat().st_size < 200_000
        assert f'src="{plots.PLOTLY_JS}"' in html.read_text(encoding="utf-8")
    assert any("2 different planes" in n for n in result.notes)
    assert any("lines/ and planes/" in n for n in result.notes)
    assert any("already compared" in n for n in result.notes)

    with (out / "summary.csv").open(newline="") as fh:
        rows = {row["run_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == set(result.run_ids)
    assert rows[runs.plane4.info.run_id]["plane"] == rows[runs.plane4_small.info.run_id]["plane"]
    assert rows[runs.plane2.info.run_id]["plane"] != rows[runs.plane4.info.run_id]["plane"]
    assert rows[runs.line.info.run_id]["grid"] == "9"
    assert "difference maps need one shared plane" in (out / "summary.md").read_text()

    logged = project.client.get_run(result.run_id)
    assert logged.data.tags["landscapes.duplicate_runs"] == runs.plane4_again.info.run_id
    assert logged.data.params["runs"] == "4" and logged.data.params["duplicates"] == "1"
    assert set(project.artifacts(result.run_id, "planes")) >= {"planes/loss_log_difference.png", "planes/plotly.min.js"}
    assert "lines/loss_log_comparison.png" in project.artifacts(result.run_id, "lines")


def test_different_planes_side_by_side_only(runs: Runs, tracking_at: Project, tmp_path: Path) -> None:
    project = tracking_at
    selected = pipeline_runs(run_ids=[runs.plane2.info.run_id, runs.plane4.info.run_id])
    result = compare(selected, out_dir=tmp_path / "two", experiment_id=project.experiment_id, log=False)
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not any("difference" in n for n in names), names  # one kind only: no sub-folders
    assert "loss_comparison.png" in names and "summary.csv" in names
    assert "plotly.min.js" not in names  # by default each page carries plotly.js: MLflow's viewer renders it
    page = (tmp_path / "two" / "loss_comparison.html").read_text(encoding="utf-8")
    assert "<script src=" not in page and len(page) > 1_000_000
    assert any("difference maps need one shared plane" in n for n in result.notes)

    same = pipeline_runs(run_ids=[runs.plane4.info.run_id, runs.plane4_small.info.run_id, runs.plane4_again.info.run_id])
    result = compare(same, out_dir=tmp_path / "same", experiment_id=project.experiment_id)
    assert (tmp_path / "same" / "loss_log_difference.png").exists()
    assert not any("different planes" in n for n in result.notes)
    assert len(result.run_ids) == 2 and result.duplicates == (runs.plane4_again.info.run_id,)


@pytest.mark.parametrize(
    ("select", "match"),
    [
        pytest.param(
            lambda r: pipeline_runs(experiment_id=r.project.experiment_id,
                                    filter_string="tags.`landscapes.checkpoint` = 'no-such.pt'"),
            r"^compare: the selection is empty: no finished pipeline run with a landscape store in experiment",
            id="empty-filter",
        ),
        pytest.param(
            lambda r: pipeline_runs(run_ids=[r.plane2.info.run_id, r.project.train_run_id]),
            r"^compare: the selection mixes in run\(s\) without a finished landscape: [0-9a-f]{8} \(train",
            id="mixed-ids",
        ),
        pytest.param(
            lambda r: pipeline_runs(run_ids=["0123456789abcdef0123456789abcdef"]),
            r"^compare: no run '0123456789abcdef0123456789abcdef' in sqlite:",
            id="unknown-id",
        ),
    ],
)
def test_bad_selections_fail_in_one_line(runs: Runs, tracking_at: Project, select, match) -> None:
    with pytest.raises(ConfigurationError, match=match) as err:
        select(runs)
    assert "\n" not in str(err.value)


def test_errors_leave_no_output_folder(runs: Runs, tracking_at: Project, tmp_path: Path) -> None:
    out = tmp_path / "nothing"
    with pytest.raises(ConfigurationError, match=r"^compare: the selection is empty") as err:
        compare([], out_dir=out, experiment_id=tracking_at.experiment_id)
    assert "\n" not in str(err.value) and not out.exists()

    train = tracking_at.client.get_run(tracking_at.train_run_id)
    with pytest.raises(ConfigurationError, match=r"have no landscape store") as err:
        compare([runs.plane2, train], out_dir=out, experiment_id=tracking_at.experiment_id)
    assert "\n" not in str(err.value) and not out.exists()

    before = {r.info.run_id for r in tracking_at.search("tags.`landscapes.kind` = 'compare'")}
    proc = tracking_at.cli("pipelines.compare", "--runs", runs.plane2.info.run_id, tracking_at.train_run_id,
                           "--tracking-uri", tracking_at.uri, "--out", str(out), check=False)
    assert proc.returncode != 0 and "the selection mixes in run(s)" in proc.stderr
    assert not out.exists()
    assert {r.info.run_id for r in tracking_at.search("tags.`landscapes.kind` = 'compare'")} == before
