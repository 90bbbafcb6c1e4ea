"""Across a training run, end to end on the demo: the PCA plane of its checkpoints with the
trajectory drawn over it, one shared plane for a sweep, mode connectivity, exports."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray
from PIL import Image

from landscapes.directions_store import load_directions
from landscapes.export import read_vtk
from landscapes.store import LandscapeStore
from pipelines.comparison import animate_sweep, compare, pipeline_runs
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

    # exports beside the plots, logged with them: NetCDF that xarray reads, VTK with the same values
    assert project.artifacts(report.info.run_id, "exports") == ["exports/landscape.nc", "exports/landscape.vts"]
    exports = Path(result["plots"][0]).parents[1] / "exports"
    values = store.to_xarray()
    with xarray.open_dataset(exports / "landscape.nc") as nc:
        for name in ("loss", "accuracy"):
            np.testing.assert_array_equal(nc[name].values, values[name].values)
        np.testing.assert_array_equal(nc["x"].values, values["x"].values)
    vtk = read_vtk(exports / "landscape.vts")
    np.testing.assert_array_equal(vtk["loss"].reshape(values["loss"].shape, order="F"), values["loss"].values)
    from vtkmodules.util.numpy_support import vtk_to_numpy  # VTK's own reader (ParaView's) agrees
    from vtkmodules.vtkIOXML import vtkXMLStructuredGridReader

    reader = vtkXMLStructuredGridReader()
    reader.SetFileName(str(exports / "landscape.vts"))
    reader.Update()
    loss = vtk_to_numpy(reader.GetOutput().GetPointData().GetArray("loss"))
    np.testing.assert_array_equal(loss.reshape(values["loss"].shape, order="F"), values["loss"].values)


def test_pca_without_a_trajectory_says_what_to_give(project: Project) -> None:
    from landscapes.errors import CheckpointNotFoundError, ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^directions\.kind=pca needs the checkpoints of a training run"):
        project.run("directions=pca", f"directions.trajectory=[{project.checkpoint(2)}]", *FAST)
    with pytest.raises(CheckpointNotFoundError, match=r"^directions\.trajectory\[0\]='nowhere/epoch_\*\.pt': the pattern matches no file"):
        project.run("directions=pca", "directions.trajectory=[nowhere/epoch_*.pt]", *FAST)
    assert not project.search("tags.`landscapes.kind` = 'pipeline'")  # refused before any run was opened


@contextlib.contextmanager
def _tracking(project: Project) -> Iterator[None]:
    """The global tracking URI (what the compare stage reads and logs to) at the project's store."""
    import mlflow

    mp, previous = project.environment(), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(project.uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        mp.undo()


def _compare(project: Project, run_ids: list[str], out: Path):
    with _tracking(project):
        return compare(pipeline_runs(run_ids=run_ids), out_dir=out, experiment_id=project.experiment_id)


def test_shared_plane_gives_one_plane_and_differences(project: Project, tmp_path: Path) -> None:
    origin = project.checkpoint(4)
    results = [project.run("debug=default", f"checkpoint.path={project.checkpoint(e)}", f"directions.origin={origin}")
               for e in (0, 2)]
    a, b = (LandscapeStore.open(r["store"], mode="r") for r in results)
    assert a.path != b.path  # each checkpoint its own store (its buffers, its position on the plane)
    assert results[0]["directions"] == results[1]["directions"]  # one directions store, made once
    for name in ("x", "y"):
        np.testing.assert_array_equal(a.to_xarray()[name].values, b.to_xarray()[name].values)
    np.testing.assert_array_equal(a.read_directions(), b.read_directions())
    assert a.attrs["plane"]["mode"] == "shared" and a.attrs["plane"]["origin"]["sha256"] == b.attrs["plane"]["origin"]["sha256"]
    assert a.attrs["landscapes.plane"] == b.attrs["landscapes.plane"]
    assert a.attrs["checkpoint"]["path"] != b.attrs["checkpoint"]["path"]
    # the origin is epoch 4 in both: the same weights at every grid point, so the same values (no buffers)
    np.testing.assert_allclose(a.to_xarray()["loss"].values, b.to_xarray()["loss"].values, rtol=1e-6)
    # each run's own checkpoint is marked where it lies on the plane
    subjects = [s.attrs["subject"] for s in (a, b)]
    assert [s["labels"] for s in subjects] == [["epoch_000"], ["epoch_002"]]
    assert all(s["distance"][0] > 0 for s in subjects)
    made = [project.client.get_run(r["run_id"]).data.tags["landscapes.stage_run.directions"] for r in results]
    assert made[0] == made[1]  # the second job reused the first one's directions stage

    result = _compare(project, [r["run_id"] for r in results], tmp_path / "shared")
    assert (tmp_path / "shared" / "loss_log_difference.png").exists()
    assert any(n.startswith("mode: shared plane (origin epoch_004)") for n in result.notes), result.notes

    with _tracking(project):
        gif = animate_sweep(pipeline_runs(run_ids=[r["run_id"] for r in reversed(results)]), tmp_path / "anim")
    with Image.open(gif) as img:
        assert img.n_frames == 2  # one frame per checkpoint


def test_per_checkpoint_planes_refuse_differences_naming_the_option(project: Project, tmp_path: Path) -> None:
    results = [project.run("debug=default", f"checkpoint.path={project.checkpoint(e)}") for e in (2, 4)]
    with _tracking(project):  # no animation of landscapes on different planes
        assert animate_sweep(pipeline_runs(run_ids=[r["run_id"] for r in results]), tmp_path / "anim") is None
    for r in results:
        assert LandscapeStore.open(r["store"], mode="r").attrs["plane"]["mode"] == "per-checkpoint"
    result = _compare(project, [r["run_id"] for r in results], tmp_path / "own")
    assert not any("difference" in p.name for p in (tmp_path / "own").iterdir())
    refusal = next(n for n in result.notes if "difference maps need one shared plane" in n)
    assert "directions.origin=<checkpoint>" in refusal
    assert any(n.startswith("mode: per-checkpoint planes") for n in result.notes)


def test_connectivity_preset(project: Project) -> None:
    import torch

    from pipelines.builders import load_model

    result = project.run("experiment=connectivity", "data.limit=256", "connectivity.fit_steps=10",
                         "connectivity.steps=5")
    stages = project.stages(result["run_id"])
    assert sorted(stages) == ["checkpoint", "connectivity"]  # stop_after=connectivity: no grid
    run = stages["connectivity"]
    assert run.data.metrics["connectivity_seconds"] > 0  # the stage run keeps its cost ...
    assert not any("barrier" in k for k in run.data.metrics)
    m = project.client.get_run(result["run_id"]).data.metrics  # ... the pipeline run the barriers
    for path in ("linear", "bezier"):
        for what in ("loss", "error"):
            assert m[f"{path}_{what}_barrier_frankle"] >= 0 and m[f"{path}_{what}_barrier_entezari"] >= 0
    files = project.artifacts(run.info.run_id)
    assert {"bend.pt", "paths.json", "paths.png"} <= set(files), files
    record = json.loads(Path(_local(project, run, "paths.json")).read_text())
    linear = record["paths"]["linear"]
    assert linear["t"][0] == 0.0 and linear["t"][-1] == 1.0 and len(linear["t"]) == 5
    # the ends are the two checkpoints' own values, on both paths
    assert record["paths"]["bezier"]["values"]["loss"][0] == linear["values"]["loss"][0]
    assert record["paths"]["bezier"]["values"]["loss"][-1] == linear["values"]["loss"][-1]
    assert m["linear_loss_barrier_frankle"] == pytest.approx(linear["barriers"]["loss"]["frankle"])
    cfg = project.resolved("experiment=connectivity")
    bend = load_model(cfg.model, Path(_local(project, run, "bend.pt")), trust_pickle=False)  # a checkpoint
    start = load_model(cfg.model, project.checkpoint(4), trust_pickle=False)
    assert any(not torch.equal(p, q) for p, q in zip(bend.parameters(), start.parameters(), strict=True))


def test_connectivity_without_towards_says_what_to_give(project: Project) -> None:
    from landscapes.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^connectivity\.towards is missing"):
        project.run("connectivity.enabled=true", "stop_after=connectivity")


def _local(project: Project, run, name: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name,
                                               tracking_uri=project.uri)


@pytest.mark.slow
def test_shared_plane_sweep_through_the_cli(project: Project) -> None:
    """``-m`` over the demo's checkpoints on the plane through the last one: a difference plot on
    the comparison, and the animation on the sweep's run."""
    ck = project.checkpoint
    proc = project.cli("pipelines.run", "-m", "debug=default", f"checkpoint.path={ck(0)},{ck(2)},{ck(4)}",
                       f"directions.origin={ck(4)}")
    assert "compared 3 landscapes" in proc.stdout
    sweep = project.search("tags.`landscapes.kind` = 'sweep'")[0]
    jobs = project.children(sweep.info.run_id, "pipeline")
    stores = [LandscapeStore.open(r.data.tags["landscapes.store"], mode="r") for r in jobs]
    assert len({s.path for s in stores}) == 3
    first = stores[0]
    for other in stores[1:]:
        assert other.attrs["landscapes.plane"] == first.attrs["landscapes.plane"]
        np.testing.assert_array_equal(other.read_directions(), first.read_directions())
        for name in ("x", "y"):
            np.testing.assert_array_equal(other.to_xarray()[name].values, first.to_xarray()[name].values)
        assert other.attrs["plane"]["origin"] == first.attrs["plane"]["origin"]
    compare = project.children(sweep.info.run_id, "compare")[0]
    assert "loss_log_difference.png" in project.artifacts(compare.info.run_id)
    assert compare.data.tags["landscapes.compare_mode"].startswith("shared plane (origin epoch_004)")
    assert "animation/loss_sweep.gif" in project.artifacts(sweep.info.run_id, "animation")


def test_run_titles_name_the_pca_plane_and_the_shared_origin(project: Project) -> None:
    from pipelines.records import run_title

    pca = project.resolved("experiment=trajectory_pca")
    assert run_title(pca, "ck/epoch_004.pt") == "epoch_004 · plane 11² pca of the trajectory"
    shared = project.resolved("grid.steps=5", f"directions.origin={project.checkpoint(4)}")
    assert run_title(shared, "ck/epoch_002.pt") == "epoch_002 · plane 5² filter s0 @ epoch_004"


def test_shared_plane_figures_of_each_checkpoint_itself(project: Project) -> None:
    """On a shared plane θ0 is the one origin (the same loss in every job); ``*_at_checkpoint`` are
    the metrics at the job's own checkpoint, on the same samples, and the sweep charts those."""
    import torch
    import torch.nn.functional as F

    from pipelines.demo import DemoMLP, load_digits_tensors
    from pipelines.records import HEADLINE_METRICS

    origin, limit = project.checkpoint(4), 64
    results = {e: project.run("debug=default", "grid.steps=3", f"data.limit={limit}", f"checkpoint.path={project.checkpoint(e)}",
                              f"directions.origin={origin}") for e in (0, 2)}
    x, y = (t[:limit] for t in load_digits_tensors())
    figures = {}
    for e, result in results.items():
        model = DemoMLP()
        model.load_state_dict(torch.load(project.checkpoint(e), weights_only=True))
        with torch.no_grad():
            logits = model.eval()(x)
        run = project.client.get_run(result["run_id"])
        figures[e] = run.data.metrics
        assert run.data.metrics["loss_at_checkpoint"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert run.data.metrics["accuracy_at_checkpoint"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        assert "loss_at_checkpoint" in HEADLINE_METRICS and "accuracy_at_checkpoint" in HEADLINE_METRICS
        assert f"loss at epoch_{e:03d} **{run.data.metrics['loss_at_checkpoint']:.4g}**" in run.data.tags["mlflow.note.content"]
        assert "loss at the origin epoch_004" in run.data.tags["mlflow.note.content"]
    assert figures[0]["loss_at_theta0"] == pytest.approx(figures[2]["loss_at_theta0"], rel=1e-6)  # the shared origin
    assert figures[0]["loss_at_checkpoint"] > figures[2]["loss_at_checkpoint"] * 1.05  # epoch 0 is worse than epoch 2

    own = project.run("debug=default", "grid.steps=3", f"data.limit={limit}", f"checkpoint.path={project.checkpoint(2)}")
    metrics = project.client.get_run(own["run_id"]).data.metrics  # its own plane: θ0 is the checkpoint, no duplicate
    assert "loss_at_checkpoint" not in metrics
    assert metrics["loss_at_theta0"] == pytest.approx(figures[2]["loss_at_checkpoint"], rel=1e-5)


def test_curve_between_two_seeds_lowers_the_barrier(project: Project) -> None:
    """Two demo networks trained from different seeds: the fitted Bézier curve's loss barrier is
    lower than the straight line's, both logged on the pipeline run, and its ends are the networks."""
    from pipelines.training import train

    other = train({"out_dir": project.root / "outputs" / "seed1", "epochs": 4, "checkpoint_every": 4, "seed": 1,
                   "tracking_uri": project.uri, "experiment": "seed1"})
    result = project.run("experiment=connectivity", f"connectivity.towards={other.checkpoints[-1]}",
                         "connectivity.fit_steps=150", "connectivity.steps=9")
    m = project.client.get_run(result["run_id"]).data.metrics
    assert m["linear_loss_barrier_frankle"] > 0.05  # two minima apart: the straight line climbs
    assert m["bezier_loss_barrier_frankle"] < m["linear_loss_barrier_frankle"]
    record = json.loads(Path(_local(project, project.stages(result["run_id"])["connectivity"], "paths.json")).read_text())
    bezier, linear = record["paths"]["bezier"]["values"]["loss"], record["paths"]["linear"]["values"]["loss"]
    assert (bezier[0], bezier[-1]) == (linear[0], linear[-1])
