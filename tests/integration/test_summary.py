"""``python -m pipelines.summary --last-sweep``: the demo's closing table and MLflow UI addresses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import Project


@pytest.fixture(scope="module")
def swept(module_project: Project) -> Project:
    """A 2-checkpoint debug sweep (with its comparison) in the module's project."""
    ckpts = ",".join(str(module_project.checkpoint(e)) for e in (0, 4))
    module_project.cli("pipelines.run", "-m", f"checkpoint.path={ckpts}", "debug=default")
    return module_project


@pytest.mark.slow
def test_last_sweep_prints_table_and_ui_addresses(swept: Project) -> None:
    out = swept.cli("pipelines.summary", "--last-sweep").stdout
    (sweep,) = swept.search("tags.`landscapes.kind` = 'sweep'")
    (cmp,) = swept.search("tags.`landscapes.kind` = 'compare'")
    pipelines = swept.children(sweep.info.run_id, "pipeline")
    assert len(pipelines) == 2
    lines = out.splitlines()
    assert re.match(r"checkpoint\s+loss at θ0\s+min loss\s+store$", lines[0])
    for run, stem in zip(sorted(pipelines, key=lambda r: r.data.tags["landscapes.checkpoint"]), ("epoch_000", "epoch_004"), strict=True):
        (row,) = [ln for ln in lines if ln.startswith(stem + " ")]
        assert f"{run.data.metrics['loss_at_theta0']:.4g}" in row
        assert f"{run.data.metrics['loss_min']:.4g}" in row
        assert row.endswith(run.data.tags["landscapes.store"])
    # the jobs' plot folders (<num>_<checkpoint>) and the comparison's, as they are on disk
    root = sweep.data.tags["landscapes.sweep_dir"]
    plots = [ln.split(maxsplit=1)[1] for ln in lines if ln.startswith("  plots:")]
    assert plots == [f"{root}/0_epoch_000/plots/", f"{root}/1_epoch_004/plots/"], out
    assert all(any(Path(p).glob("loss_contour*.png")) for p in plots)
    assert f"  comparison: {root}/compare/" in lines
    ui = f"http://127.0.0.1:5000/#/experiments/{swept.experiment_id}/runs/"
    assert f"  sweep:      {ui}{sweep.info.run_id}" in lines
    assert f"  comparison: {ui}{cmp.info.run_id}" in lines


@pytest.mark.slow
def test_summary_by_sweep_id_with_another_ui(swept: Project) -> None:
    from pipelines.summary import format_summary, sweep_summary

    (sweep,) = swept.search("tags.`landscapes.kind` = 'sweep'")
    text = format_summary(sweep_summary(swept.uri, sweep_run_id=sweep.info.run_id), ui="http://host:8080/")
    assert f"http://host:8080/#/experiments/{swept.experiment_id}/runs/{sweep.info.run_id}" in text


@pytest.mark.slow
def test_no_sweep_says_how_to_make_one(project: Project) -> None:
    proc = project.cli("pipelines.summary", "--last-sweep", check=False)
    assert proc.returncode == 1
    assert "has no sweep run; run a sweep first" in proc.stderr
