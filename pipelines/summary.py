"""``python -m pipelines.summary --last-sweep``: what a sweep made, and where to see it in the MLflow UI.

Prints one line per checkpoint of the newest sweep (or ``--sweep RUN_ID``): loss at θ0, the
lowest loss on the grid and the landscape store, then the folders of the jobs' plots and of the
comparison (``<sweep dir>/<num>_<checkpoint>/plots/``, ``<sweep dir>/compare/``, those on disk)
and the MLflow UI addresses of the sweep's run and of its comparison run. ``make demo`` calls it after the sweep. It only reads the
tracking store.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from landscapes.errors import ConfigurationError

__all__ = ["SweepSummary", "sweep_summary", "format_summary", "run_url", "main"]

UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui --port 5000`` serves (the address the demo prints)."""


@dataclass(frozen=True)
class SweepSummary:
    """A finished (or failed) sweep: its run, its pipeline runs by start time, its comparison run."""

    experiment_id: str
    sweep: Run
    pipelines: tuple[Run, ...]
    compare: Run | None


def run_url(experiment_id: str, run_id: str, ui: str = UI) -> str:
    """The MLflow UI page of one run: ``<ui>/#/experiments/<id>/runs/<run_id>``."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def sweep_summary(tracking_uri: str, *, experiment: str = "landscapes", sweep_run_id: str | None = None) -> SweepSummary:
    """Read the newest sweep of ``experiment`` (or the sweep ``sweep_run_id``) and its child runs.

    Raises:
        ConfigurationError: No such experiment, or no sweep in it.
    """
    client = MlflowClient(tracking_uri)
    if sweep_run_id:
        sweep = client.get_run(sweep_run_id)
        exp_id = sweep.info.experiment_id
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigurationError(f"summary: no experiment named {experiment!r} in {tracking_uri}; run a sweep "
                                     "first (python -m pipelines.run -m checkpoint.path=a.pt,b.pt).")
        exp_id = exp.experiment_id
        sweeps = client.search_runs([exp_id], "tags.`landscapes.kind` = 'sweep'", order_by=["attributes.start_time DESC"],
                                    max_results=1)
        if not sweeps:
            raise ConfigurationError(f"summary: experiment {experiment!r} in {tracking_uri} has no sweep run; run a "
                                     "sweep first (python -m pipelines.run -m checkpoint.path=a.pt,b.pt).")
        sweep = sweeps[0]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    pipelines = tuple(r for r in children if r.data.tags.get("landscapes.kind") == "pipeline")
    compares = [r for r in children if r.data.tags.get("landscapes.kind") == "compare"]
    return SweepSummary(exp_id, sweep, pipelines, compares[-1] if compares else None)


def _number(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def format_summary(summary: SweepSummary, *, ui: str = UI) -> str:
    """The table (checkpoint, loss at θ0, min loss, store) and the UI addresses, as printed."""
    rows = [("checkpoint", "loss at θ0", "min loss", "store")]
    for run in summary.pipelines:
        tags, metrics = run.data.tags, run.data.metrics
        name = Path(tags.get("landscapes.checkpoint", run.info.run_name or run.info.run_id)).stem
        if run.info.status != "FINISHED":
            name += f" ({run.info.status.lower()})"
        rows.append((name, _number(metrics.get("loss_at_theta0")), _number(metrics.get("loss_min")),
                     tags.get("landscapes.store", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
    sweep = summary.sweep
    lines += _folders(sweep)
    lines += ["", f"MLflow UI ({sweep.info.run_name}, {sweep.info.status.lower()}):",
              f"  sweep:      {run_url(summary.experiment_id, sweep.info.run_id, ui)}"]
    if summary.compare is not None:
        lines.append(f"  comparison: {run_url(summary.experiment_id, summary.compare.info.run_id, ui)}")
    else:
        lines.append("  comparison: none (a sweep compares two or more finished landscapes)")
    return "\n".join(lines)


def _folders(sweep: Run) -> list[str]:
    """The jobs' plot folders and the comparison's folder under the sweep's folder, those on disk."""
    where = sweep.data.tags.get("landscapes.sweep_dir")
    if not where:
        return []
    root = Path(where)
    jobs = sorted((p for p in root.glob("*/plots") if p.is_dir()),
                  key=lambda p: (int(p.parent.name.split("_")[0]) if p.parent.name.split("_")[0].isdigit() else 1 << 30,
                                 p.parent.name))
    lines = ["", f"Folders ({root}):"] + [f"  plots:      {p}/" for p in jobs]
    if (root / "compare").is_dir():
        lines.append(f"  comparison: {root / 'compare'}/")
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> str:
    from pipelines.paths import project_root
    from pipelines.tracking import default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m pipelines.summary", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--last-sweep", action="store_true", help="the newest sweep of the experiment")
    which.add_argument("--sweep", default=None, metavar="RUN_ID", help="this sweep run")
    parser.add_argument("--experiment", default="landscapes", help="experiment to search (default: landscapes)")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db")
    parser.add_argument("--ui", default=UI, help=f"address of the MLflow UI (default: {UI})")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(project_root())
    text = format_summary(sweep_summary(uri, experiment=args.experiment, sweep_run_id=args.sweep), ui=args.ui)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except ConfigurationError as err:  # one line: the cause and the fix
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
