"""Across a training run, end to end on the demo: the PCA plane of its checkpoints with the
trajectory drawn over it, one shared plane for a sweep, mode connectivity, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from landscapes.directions_store import load_directions
from landscapes.store import LandscapeStore
from tests.integration.conftest import Project

FAST = ("grid.steps=5", "plot.html=false", "data.limit=256")


def test_trajectory_pca_preset(project: Project) -> None:
    result = project.run("experiment=trajectory_pca", *FAST)
    flat, attrs = load_directions(Path(result["directions"]))
    assert attrs["kind"] == "pca" and flat.shape[0] == 2
    record = attrs["trajectory"]
    assert record["labels"] == ["epoch_000", "epoch_002", "epoch_004"]
    coords = np.asarray(record["coords"])
    np.testing.assert_allclose(coords[-1], 0.0, atol=1e-9)  # θ0 is the final checkpoint: the origin
    np.testing.assert_allclose(np.abs(coords).max(axis=0), 1.0, rtol=1e-9)  # scaled to reach ±1
    assert record["distance"][-1] == 0.0
    ratios = attrs["explained_variance_ratio"]
    assert 0.0 < sum(ratios) <= 1.0 + 1e-12 and ratios[0] >= ratios[1]
    # three checkpoints around the last: two displacements, so the plane holds every weight's move
    assert sum(ratios) == pytest.approx(1.0, abs=1e-9)

    stage = project.stages(result["run_id"])["directions"]
    assert stage.data.metrics["direction_0_explained_variance_ratio"] == pytest.approx(ratios[0])
    assert stage.data.metrics["plane_explained_fraction"] == pytest.approx(record["plane_explained"])
    store = LandscapeStore.open(result["store"], mode="r")
    assert store.attrs["directions"]["trajectory"] == record  # the landscape carries the trajectory
    plots = [Path(p).name for p in result["plots"]]
    assert "loss_trajectory_log.png" in plots and "accuracy_trajectory.png" in plots
    report = project.stages(result["run_id"])["report"]
    assert "plots/loss_trajectory_log.png" in project.artifacts(report.info.run_id, "plots")


def test_pca_without_a_trajectory_says_what_to_give(project: Project) -> None:
    from landscapes.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"directions\.trajectory"):
        project.run("directions=pca", "directions.trajectory=[]", *FAST)
    with pytest.raises(Exception, match=r"matches no file"):
        project.run("directions=pca", "directions.trajectory=[nowhere/epoch_*.pt]", *FAST)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())
