"""The compare stage: line up finished landscapes across checkpoints and training runs.

Run by a sweep's callback at its end, or by ``python -m pipelines.compare`` (`pipelines.compare`).
Runs are deduplicated by landscape store (a reused run points at the same store) and grouped by
grid kind: 2-D planes and 1-D lines are compared apart (in ``planes/`` and ``lines/`` when the
selection holds both). Planes are told apart by the MLflow tag ``landscapes.directions`` (the
directions stage's identity: directions and θ0); landscapes on different planes are shown side
by side only, difference maps are drawn within one plane. Writes panels on one colour scale,
overlaid curves for lines, and a table of the summary metrics, all logged as a comparison run.
Nothing is written when the selection is empty or cannot be compared.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from landscapes import plots
from landscapes.errors import ConfigurationError, StoreError
from landscapes.store import LandscapeStore
from pipelines import tracking
from pipelines.config import PlotlyJs

SUMMARY_KEYS = ("loss_at_theta0", "accuracy_at_theta0", "loss_min", "loss_max", "sharpness_r0.1", "flat_area_tol0.1", "loss_nan_count")
TAG_STORE = "landscapes.store"
TAG_PLANE = "landscapes.directions"  # the directions stage's identity: same directions and θ0 → same plane
METRICS = ("loss", "accuracy")
_KIND_DIRS = {1: "lines", 2: "planes"}


@dataclass(frozen=True)
class CompareOutputs:
    run_id: str
    files: tuple[Path, ...]
    table: Path
    run_ids: tuple[str, ...] = ()  # the runs compared, one per landscape store
    duplicates: tuple[str, ...] = ()  # runs left out: their store is already compared
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    run: Run
    ds: Any  # xarray.Dataset
    label: str
    ndim: int
    plane: str | None
    mode: str = "per-checkpoint"  # the store's plane mode: "shared" (directions.origin) or "per-checkpoint"


def pipeline_runs(*, run_ids: list[str] | None = None, experiment_id: str | None = None,
                  parent_run_id: str | None = None, filter_string: str = "") -> list[Run]:
    """Finished pipeline runs, by id, by parent (a sweep) or by experiment and filter.

    Raises:
        ConfigurationError: (one line) nothing matches, or ``run_ids`` names runs that are not
            finished pipeline runs with a landscape store (a training, stage or compare run).
    """
    client = MlflowClient()
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except MlflowException:
                raise ConfigurationError(
                    f"compare: no run {rid!r} in {mlflow.get_tracking_uri()}; pass ids of pipeline runs "
                    "(their MLflow tag landscapes.kind is 'pipeline')."
                ) from None
        bad = [r for r in runs if not _comparable(r)]
        if bad:
            what = ", ".join(f"{r.info.run_id[:8]} ({_describe(r)})" for r in bad)
            raise ConfigurationError(
                f"compare: the selection mixes in run(s) without a finished landscape: {what}; pass only "
                "finished pipeline runs (tag landscapes.kind = 'pipeline' with a landscapes.store)."
            )
        return _unique(runs)
    if experiment_id is None:
        raise ConfigurationError("compare: give run ids (--runs) or an experiment (--experiment).")
    clauses = [f"tags.`{tracking.TAG_KIND}` = 'pipeline'", "attributes.status = 'FINISHED'"]
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    if filter_string:
        clauses.append(filter_string)
    runs = client.search_runs([experiment_id], " and ".join(clauses), order_by=["attributes.start_time ASC"])
    usable = [r for r in runs if r.data.tags.get(TAG_STORE)]
    if not usable:
        where = f"parent run {parent_run_id}" if parent_run_id else f"experiment {experiment_id}"
        extra = f" and filter {filter_string!r}" if filter_string else ""
        raise ConfigurationError(
            f"compare: the selection is empty: no finished pipeline run with a landscape store in {where}{extra}; "
            "run `python -m pipelines.run` first, or check the run ids / filter."
        )
    return usable


def _comparable(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(tracking.TAG_KIND) == "pipeline" and bool(tags.get(TAG_STORE)) and run.info.status == "FINISHED"


def _describe(run: Run) -> str:
    kind = run.data.tags.get(tracking.TAG_KIND) or "untagged"
    if kind == "pipeline":
        return f"pipeline run, {run.info.status.lower()}" + ("" if run.data.tags.get(TAG_STORE) else ", no store")
    return f"{kind} run"


def _unique(runs: list[Run]) -> list[Run]:
    seen: dict[str, Run] = {}
    for r in runs:
        seen.setdefault(r.info.run_id, r)
    return list(seen.values())


def dedupe_by_store(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """``(kept, duplicates)``: the first run of each landscape store, and the others."""
    kept: dict[str, Run] = {}
    duplicates = []
    for run in _unique(runs):
        store = str(Path(run.data.tags[TAG_STORE]).expanduser().absolute())
        if store in kept:
            duplicates.append(run)
        else:
            kept[store] = run
    return list(kept.values()), duplicates


def compare(runs: list[Run], *, out_dir: Path, experiment_id: str, parent_run_id: str | None = None,
            log: bool = True, plotlyjs: str = "embed") -> CompareOutputs:
    """Render the comparison of ``runs`` and log it as one run (child of ``parent_run_id``).

    ``plotlyjs``: ``"embed"`` (each HTML page carries plotly.js, so it renders in MLflow's artifact
    viewer) or ``"directory"`` (one ``plotly.min.js`` beside the pages).

    Raises:
        ConfigurationError: (one line, before anything is written) an empty selection, a run
            without a store, a store that cannot be opened, or nothing 1-D or 2-D to compare.
    """
    if not runs:
        raise ConfigurationError(
            "compare: the selection is empty; nothing to compare. Pass pipeline run ids, or a filter that matches some."
        )
    missing = [r.info.run_id[:8] for r in runs if not r.data.tags.get(TAG_STORE)]
    if missing:
        raise ConfigurationError(
            f"compare: run(s) {', '.join(missing)} have no landscape store (tag {TAG_STORE}); pass finished pipeline runs only."
        )
    kept, duplicates = dedupe_by_store(runs)
    entries = _open(kept)
    groups = {n: [e for e in entries if e.ndim == n] for n in _KIND_DIRS}
    groups = {n: g for n, g in groups.items() if g}
    if not groups:
        dims = sorted({e.ndim for e in entries})
        raise ConfigurationError(
            f"compare: the selected landscapes have {dims} dims; only 1-D lines and 2-D planes can be compared."
        )
    skipped = [e for e in entries if e.ndim not in _KIND_DIRS]
    notes = _notes(groups, skipped, duplicates)
    created = not out_dir.exists()
    try:
        files = _render(groups, out_dir, log=log, split=len(groups) > 1, plotlyjs=plotlyjs)
        table = _write_table([e for n in sorted(groups) for e in groups[n]], out_dir / "summary.csv", notes)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    compared = [e.run for n in sorted(groups) for e in groups[n]]
    tags = {tracking.TAG_KIND: "compare", "landscapes.compared_runs": ",".join(r.info.run_id for r in compared)}
    if duplicates:
        tags["landscapes.duplicate_runs"] = ",".join(r.info.run_id for r in duplicates)
    if notes:
        tags["landscapes.compare_notes"] = " | ".join(notes)[:5000]
    mode = next((n for n in notes if n.startswith("mode: ")), None)  # 2-D landscapes: which plane mode
    if mode:
        tags["landscapes.compare_mode"] = mode.removeprefix("mode: ").rstrip(".")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare {len(compared)} landscapes",
                          nested=parent_run_id is not None, parent_run_id=parent_run_id, tags=tags) as run:
        labels = [e.label for n in sorted(groups) for e in groups[n]]
        mlflow.log_params({"runs": len(compared), "labels": ", ".join(labels)[:500], "duplicates": len(duplicates)})
        run_id = run.info.run_id
        result = CompareOutputs(run_id=run_id, files=tuple(files), table=table,
                                run_ids=tuple(r.info.run_id for r in compared),
                                duplicates=tuple(r.info.run_id for r in duplicates), notes=tuple(notes))
        log_files(result, out_dir, run_id)
    return result


def log_files(result: CompareOutputs, out_dir: Path, run_id: str, artifact_path: str = "") -> None:
    """Log the comparison's plots and summary table (``summary.csv``, ``summary.md``) as artifacts of
    ``run_id`` under ``artifact_path``, laid out as in ``out_dir`` (a sweep's run carries them too)."""
    client = MlflowClient()
    for f in [*result.files, result.table, result.table.with_suffix(".md")]:
        where = (Path(artifact_path) / f.parent.relative_to(out_dir)).as_posix()
        client.log_artifact(run_id, str(f), artifact_path=None if where == "." else where)


def _open(runs: list[Run]) -> list[_Entry]:
    entries: list[_Entry] = []
    labels: list[str] = []
    for run in runs:
        path = run.data.tags[TAG_STORE]
        try:
            store = LandscapeStore.open(path, mode="r")
            ds = store.to_xarray()
        except (OSError, StoreError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigurationError(
                f"compare: the landscape store of run {run.info.run_id[:8]} ({path}) cannot be opened ({first}); "
                "re-run that pipeline run, or leave it out of the selection."
            ) from None
        label = _label(run, labels)
        labels.append(label)
        # the plane recorded in the store (origin, directions and grid digests), else the directions tag
        plane = ds.attrs.get(plots.PLANE_ATTR) or run.data.tags.get(TAG_PLANE)
        entries.append(_Entry(run, ds, label, len(store.dims), plane, str((ds.attrs.get("plane") or {}).get("mode", "per-checkpoint"))))
    return entries


def _notes(groups: dict[int, list[_Entry]], skipped: list[_Entry], duplicates: list[Run]) -> list[str]:
    notes = []
    planes = groups.get(2, [])
    n_planes = len(plots.plane_groups([e.ds for e in planes], [e.plane for e in planes])) if planes else 0
    if planes:
        notes.append(f"mode: {compare_mode(planes, n_planes)}.")
    if n_planes > 1:
        notes.append(
            f"{len(planes)} 2-D landscapes lie on {n_planes} different planes (other directions or θ0): compared side "
            f"by side only; difference maps need one shared plane: {SHARED_PLANE_HINT}."
        )
    if len(groups) > 1:
        notes.append("1-D lines and 2-D planes are compared apart: see lines/ and planes/.")
    if skipped:
        notes.append(f"left out {len(skipped)} landscape(s) with other than 1 or 2 dims: {', '.join(e.label for e in skipped)}.")
    if duplicates:
        notes.append(f"left out {len(duplicates)} run(s) whose landscape store is already compared: "
                     f"{', '.join(r.info.run_id[:8] for r in duplicates)}.")
    return notes


SHARED_PLANE_HINT = ("run the sweep with directions.origin=<checkpoint> (the shared-plane mode: one origin, one "
                     "pair of directions, one grid for every job)")


def compare_mode(entries: list[_Entry], n_planes: int) -> str:
    """Which mode a comparison of 2-D landscapes used, in words."""
    shared = [e for e in entries if e.mode == "shared"]
    if n_planes == 1 and shared:
        origin = ((shared[0].ds.attrs.get("plane") or {}).get("origin") or {}).get("source", "?")
        return f"shared plane (origin {plots.checkpoint_name(str(origin))}): differences drawn"
    if n_planes == 1:
        return "one plane (the same θ0 and directions): differences drawn"
    return "per-checkpoint planes: side by side on one colour scale, no differences"


def _render(groups: dict[int, list[_Entry]], out_dir: Path, *, log: bool, split: bool, plotlyjs: str) -> list[Path]:
    files: list[Path] = []
    for ndim, entries in sorted(groups.items()):
        folder = out_dir / _KIND_DIRS[ndim] if split else out_dir
        datasets = [e.ds for e in entries]
        for metric in METRICS:
            if all(metric in ds.data_vars for ds in datasets):
                files += plots.plot_comparison(
                    datasets, [e.label for e in entries], metric, out_dir=folder,
                    log=log and metric == "loss", planes=[e.plane for e in entries],
                    include_plotlyjs=PlotlyJs(plotlyjs).include,
                )
        js = folder / plots.PLOTLY_JS
        if js.exists():
            files.append(js)  # the HTML pages load it from beside them
    return files


def _label(run: Run, taken: list[str]) -> str:
    base = run.info.run_name or run.info.run_id[:8]
    ckpt = run.data.tags.get("landscapes.checkpoint")
    if ckpt:
        base = plots.checkpoint_name(ckpt)
    label, n = base, 2
    while label in taken:
        label, n = f"{base} ({n})", n + 1
    return label


def _write_table(entries: list[_Entry], path: Path, notes: list[str]) -> Path:
    runs = [e.run for e in entries]
    keys = [k for k in SUMMARY_KEYS if any(k in r.data.metrics for r in runs)]
    rows = [[e.label, e.run.info.run_id, e.run.data.tags.get("landscapes.grid", ""), (e.plane or "")[:8],
             *(e.run.data.metrics.get(k, float("nan")) for k in keys)] for e in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["landscape", "run_id", "grid", "plane", *keys])
        writer.writerows(rows)
    md = ["| landscape | run | grid | plane | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    md += [f"| {row[0]} | {row[1][:8]} | {row[2]} | {row[3]} | " + " | ".join(f"{v:.4g}" for v in row[4:]) + " |"
           for row in rows]
    md += [""] + [f"Note: {n}" for n in notes] if notes else []
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return path


def animate_sweep(runs: list[Run], out_dir: Path, *, log: bool = True) -> Path | None:
    """A GIF (and an MP4 where ffmpeg is installed) of a shared-plane sweep's landscapes, one frame
    per checkpoint in training order (the ``epoch`` param, else the order of the runs), one colour
    scale, the checkpoints' positions on the plane growing frame by frame.

    Returns:
        The GIF, or None when the sweep is not on one shared plane of 2-D landscapes (then frames
        would put values from different points of weight space on one set of axes).
    """
    from landscapes.animation import animate

    kept, _ = dedupe_by_store(runs)
    entries = _open(kept)
    shared = [e for e in entries if e.ndim == 2 and e.mode == "shared" and "loss" in e.ds.data_vars]
    if len(shared) < 2 or len(shared) != len(entries) or len({e.plane for e in shared}) != 1:
        return None
    shared.sort(key=lambda e: float(e.run.data.params.get("epoch", "inf")))
    subjects = [e.ds.attrs.get("subject") or {} for e in shared]
    points = [s["coords"][0] for s in subjects if s.get("coords")]
    trajectory = np.asarray(points, dtype=float) if len(points) == len(shared) else None
    files = animate([e.ds for e in shared], [e.label for e in shared], out_dir / "loss_sweep.gif", metric="loss",
                    trajectory=trajectory, log=log)
    return files["gif"]
