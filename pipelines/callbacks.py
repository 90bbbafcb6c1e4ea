"""Hydra callbacks: one MLflow parent run over a sweep, and the compare stage when it ends."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from landscapes.errors import LandscapesError

ENV_SWEEP_RUN = "LANDSCAPES_SWEEP_RUN_ID"
SWEEP_RUN_FILE = "sweep_run_id"
COMPARISON_ARTIFACTS = "comparison"  # where the sweep's run keeps the comparison's plots and table


def sweep_run_id() -> str | None:
    """The sweep's parent run when this job belongs to a Hydra multirun."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    if os.environ.get(ENV_SWEEP_RUN):
        return os.environ[ENV_SWEEP_RUN]
    marker = Path(hc.sweep.dir) / SWEEP_RUN_FILE
    return marker.read_text().strip() if marker.exists() else None


@contextlib.contextmanager
def errors_in_one_line() -> Iterator[None]:
    """A known error of a single run (bad input, a full disk, a lost service) ends it with its message only.

    The message names the cause and the fix; the traceback is shown with ``LANDSCAPES_DEBUG=1``
    and inside a sweep (where Hydra reports each failed job).
    """
    try:
        yield
    except LandscapesError as err:
        if os.environ.get("LANDSCAPES_DEBUG") or sweep_run_id() is not None or _multirun():
            raise
        print(f"error: {err}", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):
            print(f"       ({note})", file=sys.stderr)
        print("       (LANDSCAPES_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def describe_sweep(overrides: list[str], sweep_dir: Path) -> tuple[str, str]:
    """The sweep run's name (what it sweeps: ``sweep checkpoint.path ×3``) and its description (Markdown:
    the values of each swept key, the fixed overrides, where the jobs and the comparison are written)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept: list[tuple[str, list[str], str]] = []  # key, values, how many ("" when Hydra expands them later)
    fixed: list[str] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            fixed.append(o.input_line or "")
            continue
        try:
            values = [str(v) for v in o.sweep_string_iterator()]
            swept.append((o.key_or_group, values, f"×{len(values)}"))
        except Exception:  # noqa: BLE001 - a glob or an interval: shown as written
            swept.append((o.key_or_group, [(o.input_line or "?").split("=", 1)[-1]], ""))
    if not swept:
        return f"sweep {sweep_dir.name}", f"A multirun of one job ({' '.join(overrides) or 'no overrides'}); jobs in `{sweep_dir}`."
    title = "sweep " + " × ".join(f"{key} {n}".strip() for key, _, n in swept)
    jobs = " × ".join(n[1:] for _, _, n in swept) if all(n for _, _, n in swept) else ""
    lines = [f"Sweeps {' and '.join(f'**{key}**' for key, _, _ in swept)}"
             + (f" ({jobs} job{'s' if jobs != '1' else ''})" if jobs else "") + f", started {sweep_dir.name}:"]
    for key, values, _ in swept:
        shown = [Path(v).stem if key == "checkpoint.path" else v for v in values]
        lines.append(f"- {key}: {', '.join(shown)}")
    if fixed:
        lines.append(f"- fixed: {' '.join(fixed)}")
    lines.append(f"- jobs in `{sweep_dir}`; the comparison in `{sweep_dir / 'compare'}` and in this run's "
                 f"artifacts, `{COMPARISON_ARTIFACTS}/`")
    return title, "\n".join(lines)


class SweepCallback(Callback):
    """Creates the tracking store and the sweep's parent run before any job starts.

    Creating the sqlite database up front matters: parallel launchers (joblib) would
    otherwise race on table creation.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the store, close this host's sweep runs whose process is gone, open this one."""
        from pipelines import tracking

        uri = tracking.configure(str(OmegaConf.select(config, "tracking.uri")),
                                 request_timeout=float(OmegaConf.select(config, "tracking.request_timeout", default=30.0)))
        artifacts = Path(str(OmegaConf.select(config, "paths.artifacts_dir")))
        self.experiment_id = tracking.get_or_create_experiment(
            str(OmegaConf.select(config, "tracking.experiment")), artifact_root=tracking.default_artifact_root(uri, artifacts)
        )
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        task = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        title, description = describe_sweep(task, sweep_dir)
        self.run_id = tracking.start_sweep_run(
            self.experiment_id, title,
            {"landscapes.sweep_dir": str(sweep_dir), "landscapes.overrides": " ".join(task)[:5000],
             "mlflow.note.content": description},
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_RUN_FILE).write_text(self.run_id + "\n")
        os.environ[ENV_SWEEP_RUN] = self.run_id

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A failed job fails the sweep's parent run at once: Hydra stops the sweep after a
        failure without calling ``on_multirun_end``, which would otherwise leave it RUNNING.
        When the tracking store itself failed, one short attempt is made, and the job's error
        stays the one reported (the next sweep closes the run if it could not be written)."""
        if job_return.status != JobStatus.FAILED:
            return
        run_id = sweep_run_id()
        if run_id is None:
            return
        from mlflow.tracking import MlflowClient

        from pipelines import tracking

        err = job_return._return_value  # the exception; .return_value would re-raise it
        overrides = " ".join(job_return.overrides or [])
        if not isinstance(err, tracking.TrackingError):
            try:
                MlflowClient().set_tag(run_id, "landscapes.failed_job", f"{overrides}: {type(err).__name__}: {err}"[:5000])
            except Exception:  # noqa: BLE001 - the job's own error is what to report
                pass
        tracking.end_run_quietly(run_id, "FAILED", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from pipelines import comparison, tracking

        if self.run_id is None:
            return
        try:
            with tracking.translate_failures():
                failed = MlflowClient().get_run(self.run_id).info.status == "FAILED"
            if failed:  # a job failed (joblib: not raised)
                return
            if OmegaConf.select(config, "compare", default=True):
                runs = comparison.pipeline_runs(experiment_id=self.experiment_id, parent_run_id=self.run_id)
                if len(runs) >= 2:
                    out = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / "compare"
                    result = comparison.compare(runs, out_dir=out, experiment_id=self.experiment_id, parent_run_id=self.run_id,
                                             log=bool(OmegaConf.select(config, "plot.log", default=True)))
                    # the sweep's own run shows the comparison too: its plots and table under comparison/
                    comparison.log_files(result, out, self.run_id, artifact_path=COMPARISON_ARTIFACTS)
                    MlflowClient().set_tag(self.run_id, "landscapes.compare_run", result.run_id)
                    print(f"compared {len(result.run_ids)} landscapes: {out} (MLflow run {result.run_id})")
                    gif = comparison.animate_sweep(runs, out, log=bool(OmegaConf.select(config, "plot.log", default=True)))
                    if gif is not None:  # a shared-plane sweep: its landscapes as frames, on the sweep's run
                        for f in (gif, gif.with_suffix(".mp4")):
                            if f.exists():
                                MlflowClient().log_artifact(self.run_id, str(f), artifact_path="animation")
        except Exception as err:
            tracking.end_run_quietly(self.run_id, "FAILED", err)
            raise
        finally:
            os.environ.pop(ENV_SWEEP_RUN, None)
        with tracking.translate_failures():
            MlflowClient().set_terminated(self.run_id, "FINISHED")
