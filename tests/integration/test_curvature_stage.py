"""The curvature stage, Hessian directions and the grid sharpness, on the trained demo (real MLflow sqlite)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import landscapes as L
from landscapes.checkpoints import load_into, load_state_dict
from landscapes.directions_store import load_directions
from landscapes.store import LandscapeStore
from pipelines.demo import DemoMLP, load_digits_tensors
from tests.integration.conftest import Project

pytestmark = pytest.mark.slow

# modest probes: the stage's figures in a few seconds on 2 cores
FAST = ("curvature.trace_probes=12", "curvature.spectrum_probes=2", "curvature.steps=20", "curvature.samples=8",
        "curvature.ascent_steps=5", "curvature.hvp=double_backward", "data.limit=128")
CURVATURE_ONLY = ("experiment=curvature", *FAST)
FIGURES = ("lambda_max", "lambda_min", "hessian_trace", "hessian_trace_stderr", "eigen_ratio", "negative_mass",
           "average_sharpness", "worst_case_sharpness")


def _demo(path: Path, limit: int = 128) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits_tensors()
    return load_into(DemoMLP(), load_state_dict(path)).eval(), (x[:limit], y[:limit])


def test_the_stage_runs_as_a_child_run_matches_the_library_and_is_reused(project: Project) -> None:
    first = project.run(*CURVATURE_ONLY)
    stages = project.stages(first["run_id"])
    assert sorted(stages) == ["checkpoint", "curvature"]  # stop_after=curvature: no grid
    run = stages["curvature"]
    assert run.info.status == "FINISHED"
    # the figures are the pipeline run's; the stage run logs its own cost only
    parent = project.client.get_run(first["run_id"])
    m = parent.data.metrics
    assert set(run.data.metrics) == {"curvature_seconds", "hessian_vector_products"}
    assert run.data.metrics["curvature_seconds"] > 0 and run.data.metrics["hessian_vector_products"] > 10
    for key in FIGURES:
        assert key in m and math.isfinite(m[key]), key
    assert m["lambda_max"] > 0 and m["lambda_max"] >= abs(m["lambda_min"])  # near a minimum: top curvature dominates
    assert m["eigen_ratio"] == pytest.approx(abs(m["lambda_min"] / m["lambda_max"]))
    assert 0 <= m["negative_mass"] <= 1
    assert run.data.params["curvature.tol"] == "0.001"
    assert run.data.params["data.limit"] == "128"
    assert sorted(project.artifacts(run.info.run_id)) == ["outputs.json", "spectrum.json", "spectrum.png"]

    # the same eigenvalues as the library called directly on the same model and data
    model, data = _demo(Path(first["checkpoint"]))
    eig = L.hessian_eigenvalues(model, torch.nn.CrossEntropyLoss(), data, k=1, which="both", tol=1e-3, seed=0,
                                hvp="double_backward")
    assert m["lambda_max"] == pytest.approx(float(eig.eigenvalues[0]), rel=1e-6)
    assert m["lambda_min"] == pytest.approx(float(eig.eigenvalues[-1]), rel=1e-6)

    assert "landscapes.store" not in parent.data.tags

    second = project.run(*CURVATURE_ONLY)
    again = project.client.get_run(second["run_id"]).data.tags
    assert again["landscapes.stage_run.curvature"] == run.info.run_id  # reused
    assert project.stages(second["run_id"]) == {}


def test_the_key_covers_the_data_and_model_mode(project: Project) -> None:
    first = project.run(*CURVATURE_ONLY)
    run_id = project.stages(first["run_id"])["curvature"].info.run_id
    for override in ("data.limit=64", "compute.model_mode=train", "curvature.rho=0.1"):
        other = project.run(*CURVATURE_ONLY, override)
        assert project.client.get_run(other["run_id"]).data.tags["landscapes.stage_run.curvature"] != run_id, override
    same = project.run(*CURVATURE_ONLY, "compute.progress=true")  # how, not what: reused
    assert project.client.get_run(same["run_id"]).data.tags["landscapes.stage_run.curvature"] == run_id


def test_a_sweep_charts_the_curvature_against_the_epoch(project: Project) -> None:
    a, b = project.checkpoint(2), project.checkpoint(4)
    project.cli("pipelines.run", "-m", *CURVATURE_ONLY, f"checkpoint.path={a},{b}")
    sweeps = project.search("tags.`landscapes.kind` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    runs = project.children(sweeps[0].info.run_id, "pipeline")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.info.run_name for r in runs) == ["epoch_002 · curvature", "epoch_004 · curvature"]
    for key in ("lambda_max", "hessian_trace"):
        history = {h.step: h.value for h in project.client.get_metric_history(sweeps[0].info.run_id, key)}
        assert sorted(history) == [2, 4], key
        for run in runs:
            assert math.isfinite(run.data.metrics[key])
            assert history[int(run.data.params["epoch"])] == run.data.metrics[key], key


def test_hessian_plane_runs_end_to_end(project: Project) -> None:
    result = project.run("experiment=hessian_plane", "debug=default", *FAST)
    stages = project.stages(result["run_id"])
    assert sorted(stages) == ["aggregate", "checkpoint", "curvature", "directions", "evaluate", "report"]
    flat, attrs = load_directions(result["directions"])
    assert attrs["kind"] == "hessian" and flat.shape[0] == 2
    assert [round(float(n), 5) for n in (flat.astype("float64") ** 2).sum(1)] == [1.0, 1.0]  # unit eigenvectors
    eigenvalues = attrs["eigenvalues"]
    assert eigenvalues[0] >= eigenvalues[1]
    curv = project.client.get_run(result["run_id"]).data.metrics  # the figures are the pipeline run's
    assert eigenvalues[0] == curv["lambda_max"]  # the same Lanczos run
    assert stages["directions"].data.metrics["direction_0_eigenvalue"] == pytest.approx(eigenvalues[0])
    assert "lambda_max" not in stages["curvature"].data.metrics

    # one Lanczos run: the curvature stage's; the directions stage read its eigenvectors
    saved, saved_attrs = load_directions(attrs["eigenvectors_from"])
    assert Path(attrs["eigenvectors_from"]).parent.name.startswith("curvature-")
    assert saved_attrs["hessian_vector_products"] > 0 and saved_attrs["eigenvalues"][:2] == eigenvalues
    assert stages["directions"].data.metrics["hessian_vector_products"] == 0
    np.testing.assert_array_equal(saved[:2], flat)

    # without the curvature stage the directions stage runs Lanczos itself, to the same plane
    alone = project.run("experiment=hessian_plane", "debug=default", *FAST, "curvature.enabled=false")
    alone_stages = project.stages(alone["run_id"])
    assert "curvature" not in alone_stages
    assert alone_stages["directions"].data.metrics["hessian_vector_products"] > 0
    own, own_attrs = load_directions(alone["directions"])
    assert "eigenvectors_from" not in own_attrs
    np.testing.assert_allclose(own_attrs["eigenvalues"], eigenvalues, rtol=1e-6)
    assert abs(float(own[0].astype("float64") @ flat[0].astype("float64"))) == pytest.approx(1.0, abs=1e-4)

    # the key covers the data: another limit, other eigenvectors
    other = project.run("experiment=hessian_plane", "debug=default", *FAST, "data.limit=64")
    assert other["directions"] != result["directions"]


def test_grid_sharpness_excludes_theta0(project: Project) -> None:
    coarse = project.run("debug=default")  # 5×5 on [-1, 1]: no point other than θ0 within 0.1
    agg = project.client.get_run(coarse["run_id"]).data.metrics
    assert "sharpness_r0.1" not in agg and "sharpness_rel_r0.1" not in agg  # absent, not 0.0
    assert "sharpness_r0.1" not in coarse["summary"]

    fine = project.run("debug=default", "summary.radius=0.5")  # the 4 neighbours at 0.5
    agg = project.client.get_run(fine["run_id"]).data.metrics
    loss = LandscapeStore.open(fine["store"], mode="r").read("loss")
    neighbours = [loss[1, 2], loss[3, 2], loss[2, 1], loss[2, 3]]
    assert agg["sharpness_r0.5"] == pytest.approx(float(np.mean(neighbours) - loss[2, 2]))
    assert agg["sharpness_rel_r0.5"] == pytest.approx(agg["sharpness_r0.5"] / abs(float(loss[2, 2])))
    assert LandscapeStore.open(fine["store"], mode="r").attrs["summary"]["sharpness_r0.5"] == pytest.approx(agg["sharpness_r0.5"])
