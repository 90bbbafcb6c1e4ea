"""``python -m pipelines.compare``: compare finished landscapes across checkpoints and runs.

``python -m pipelines.compare --runs ID [ID ...]`` or ``--experiment NAME [--filter "..."]``;
the work is `pipelines.comparison.compare`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from landscapes.errors import ConfigurationError
from pipelines import tracking
from pipelines.comparison import CompareOutputs, compare, pipeline_runs
from pipelines.paths import project_root

__all__ = ["main", "compare", "pipeline_runs", "CompareOutputs"]


def main(argv: list[str] | None = None) -> CompareOutputs:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=None, help="pipeline run ids")
    parser.add_argument("--experiment", default="landscapes", help="experiment to search (default: landscapes)")
    parser.add_argument("--filter", default="", help="extra MLflow filter, e.g. \"params.`grid.steps` = '21'\"")
    parser.add_argument("--parent", default=None, help="only children of this run (a sweep)")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db")
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default outputs/compare/<time>)")
    parser.add_argument("--no-log", action="store_true", help="linear loss scale")
    parser.add_argument("--plotlyjs", choices=["embed", "directory"], default="embed",
                        help="HTML pages carry plotly.js (embed: render in MLflow's viewer) or share one file beside them")
    args = parser.parse_args(argv)
    root = project_root()
    uri = tracking.configure(args.tracking_uri or tracking.default_tracking_uri(root))
    exp = MlflowClient().get_experiment_by_name(args.experiment)
    if exp is None and not args.runs:
        raise ConfigurationError(f"compare: no experiment named {args.experiment!r} in {uri}; run the pipeline first.")
    runs = pipeline_runs(run_ids=args.runs, experiment_id=exp.experiment_id if exp else None,
                         parent_run_id=args.parent, filter_string=args.filter)
    out = args.out or root / "outputs" / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    exp_id = exp.experiment_id if exp else runs[0].info.experiment_id
    result = compare(runs, out_dir=out, experiment_id=exp_id, parent_run_id=args.parent, log=not args.no_log,
                     plotlyjs=args.plotlyjs)
    print(f"compared {len(result.run_ids)} landscapes: {out} (MLflow run {result.run_id})")
    return result


if __name__ == "__main__":
    import os
    import sys

    from landscapes.errors import LandscapesError

    try:
        main()
    except LandscapesError as err:  # one line: the cause and the fix
        if os.environ.get("LANDSCAPES_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
