"""The compare stage: line up finished landscapes across checkpoints and training runs.

Run by a sweep's callback at its end, or by ``python -m pipelines.compare`` (`pipelines.compare`).
Writes side-by-side panels on one colour scale, difference maps when the grids match,
overlaid curves for lines, and a table of the summary metrics, all logged as a comparison run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from landscapes import plots
from landscapes.errors import ConfigurationError
from landscapes.store import LandscapeStore
from pipelines import tracking

SUMMARY_KEYS = ("loss_at_theta0", "accuracy_at_theta0", "loss_min", "loss_max", "sharpness_r0.1", "flat_area_tol0.1", "loss_nan_count")


@dataclass(frozen=True)
class CompareOutputs:
    run_id: str
    files: tuple[Path, ...]
    table: Path


def pipeline_runs(*, run_ids: list[str] | None = None, experiment_id: str | None = None,
                  parent_run_id: str | None = None, filter_string: str = "") -> list[Run]:
    """Finished pipeline runs, by id, by parent (a sweep) or by experiment and filter."""
    client = MlflowClient()
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if experiment_id is None:
            raise ConfigurationError("compare: give run ids (--runs) or an experiment (--experiment).")
        clauses = [f"tags.`{tracking.TAG_KIND}` = 'pipeline'", "attributes.status = 'FINISHED'"]
        if parent_run_id:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        if filter_string:
            clauses.append(filter_string)
        runs = client.search_runs([experiment_id], " and ".join(clauses), order_by=["attributes.start_time ASC"])
    usable = [r for r in runs if r.data.tags.get("landscapes.store")]
    if len(usable) < 1:
        raise ConfigurationError(
            "compare: no finished pipeline run with a landscape store was found; run "
            "`python -m pipelines.run` first, or check the run ids / filter."
        )
    return usable


def compare(runs: list[Run], *, out_dir: Path, experiment_id: str, parent_run_id: str | None = None,
            log: bool = True) -> CompareOutputs:
    """Render the comparison of ``runs`` and log it as one run (child of ``parent_run_id``)."""
    datasets, labels = [], []
    for run in runs:
        datasets.append(LandscapeStore.open(run.data.tags["landscapes.store"], mode="r").to_xarray())
        labels.append(_label(run, labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for metric in ("loss", "accuracy"):
        if all(metric in ds.data_vars for ds in datasets):
            files += plots.plot_comparison(datasets, labels, metric, out_dir=out_dir, log=log and metric == "loss")
    table = _write_table(runs, labels, out_dir / "summary.csv")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare {len(runs)} landscapes",
                          nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags={tracking.TAG_KIND: "compare", "landscapes.compared_runs": ",".join(r.info.run_id for r in runs)}) as run:
        mlflow.log_params({"runs": len(runs), "labels": ", ".join(labels)[:500]})
        for f in [*files, table, table.with_suffix(".md")]:
            mlflow.log_artifact(str(f))
        run_id = run.info.run_id
    return CompareOutputs(run_id=run_id, files=tuple(files), table=table)


def _label(run: Run, taken: list[str]) -> str:
    base = run.info.run_name or run.info.run_id[:8]
    ckpt = run.data.tags.get("landscapes.checkpoint")
    if ckpt:
        base = Path(ckpt).stem if "/" in ckpt or "." in ckpt else ckpt
    label, n = base, 2
    while label in taken:
        label, n = f"{base} ({n})", n + 1
    return label


def _write_table(runs: list[Run], labels: list[str], path: Path) -> Path:
    keys = [k for k in SUMMARY_KEYS if any(k in r.data.metrics for r in runs)]
    rows = [[label, r.info.run_id, *(r.data.metrics.get(k, float("nan")) for k in keys)] for label, r in zip(labels, runs, strict=True)]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["landscape", "run_id", *keys])
        writer.writerows(rows)
    md = ["| landscape | run | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    md += [f"| {row[0]} | {row[1][:8]} | " + " | ".join(f"{v:.4g}" for v in row[2:]) + " |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return path
