"""``python -m benchmarks.scaling``: the dask backend against one worker and the local backend (issue 15).

Targets: ``compute.backend=dask`` with 2 workers × 1 thread at least 1.7× as fast as 1 worker ×
1 thread on the same grid, and within 15 % of the local backend with 2 threads. Measured on the
path a user runs: the pipeline's evaluate stage (:mod:`benchmarks.stage_bench`) on W-MLP-a (the
engine's default strategy and tiles; 101×101 by default: 51 tiles of 2×101 points), each tile
written to the landscape's Zarr store and marked done, a fresh store per run. The dask runs start
their own ``LocalCluster`` (``compute.scheduler=null``) as the stage does; its start (the cluster,
the client, the evaluator shipped to the workers) is reported apart and excluded from the
evaluation time compared (the backend's ``compute_seconds``: tiles submitted, evaluated, written,
marked done). One untimed local warm-up run on a 5×5 grid first; then ``rounds`` rounds, each
running every configuration once, the order rotating from round to round; medians.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import _system_busy_seconds, until_quiet

STEPS, QUICK_STEPS = 101, 31
SPEEDUP, LIMIT = 1.7, 1.15
NAME = "scaling"
ONE, TWO, LOCAL = "dask 1 worker × 1 thread", "dask 2 workers × 1 thread", "local, 2 threads"
CONFIGS = (ONE, TWO, LOCAL)


def _children_cpu() -> float:
    """CPU seconds of this process's live descendants (the dask nannies and workers)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _dask_backend(workers: int) -> Any:
    """The stage's dask backend, also reading its workers' CPU time just before it closes them."""
    from pipelines.backends import DaskBackend

    class Measured(DaskBackend):
        children_cpu = 0.0

        def _close(self, client: Any, cluster: Any, plugin_name: str, *, reachable: bool = True) -> None:
            self.children_cpu = _children_cpu()
            DaskBackend._close(client, cluster, plugin_name, reachable=reachable)

    return Measured(workers=workers, threads_per_worker=1)


def _one(bench: Any, config: str, steps: int) -> dict[str, Any]:
    """One timed run of the evaluate stage in ``config``."""
    from pipelines.backends import LocalBackend

    saved = torch.get_num_threads()
    if config == LOCAL:
        backend, overrides = LocalBackend(), ("compute.backend=local",)
        torch.set_num_threads(2)
    else:
        workers = 1 if config == ONE else 2
        backend = _dask_backend(workers)
        overrides = ("compute.backend=dask", f"compute.workers={workers}", "compute.threads_per_worker=1")
    cfg = bench.config(steps, *overrides)
    busy, own, start = _system_busy_seconds(), time.process_time(), time.perf_counter()
    try:
        out = bench.run(cfg, backend)
    finally:
        torch.set_num_threads(saved)
    wall, own, busy = time.perf_counter() - start, time.process_time() - own, _system_busy_seconds() - busy
    bench.discard()
    ours = own + getattr(backend, "children_cpu", 0.0)
    timings = getattr(backend, "last_run", {}) if config != LOCAL else {}
    return {
        "config": config, "steps": steps, "points": out.points, "tiles": out.tiles_computed,
        "tile_shape": list(out.tile_shape), "strategy": out.strategy, "stage_s": wall,
        "evaluate_s": timings.get("compute_seconds", out.seconds),
        "start_s": timings.get("start_seconds", 0.0), "close_s": timings.get("close_seconds", 0.0),
        "workers": timings.get("workers"),
        # other processes' share of the CPUs: all busy time less this process and its workers'
        "foreign_load": max(0.0, (busy - ours) / (wall * len(os.sched_getaffinity(0)))),
    }


def run(steps: int = STEPS, rounds: int = 3, *, log: Any = None, max_foreign: float = 1.0, retries: int = 0,
        quiet_wait: float = 120.0) -> dict[str, Any]:
    """Time the three configurations on a ``steps × steps`` grid; return the JSON-able study record.

    Args:
        steps: points per axis of the grid.
        rounds: timed runs per configuration (alternating between them).
        log: ``print``-like callable for progress (default: stderr).
        max_foreign, retries, quiet_wait: a run during which other processes used more than
            ``max_foreign`` of the CPUs runs again after a quiet spell, ``retries`` times at most
            (``python -m benchmarks``' policy; the default 1.0 never reruns).
    """
    from benchmarks.stage_bench import StageBench

    if steps < 2 or rounds < 1:
        raise ValueError(f"scaling: need a grid of 2×2 points and one round at least, got steps={steps}, rounds={rounds}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        bench = StageBench(Path(tmp))
        bench.run(bench.config(5))  # warm-up: imports, kernels, lazy initialization of this process
        bench.discard()
        for r in range(rounds):
            for config in CONFIGS[r % 3:] + CONFIGS[: r % 3]:
                one = until_quiet(lambda c=config: _one(bench, c, steps), max_foreign, retries, quiet_wait, log)
                one["round"] = r
                runs.append(one)
                log(f"  [{r + 1}/{rounds}] {config}: evaluation {one['evaluate_s']:.2f} s"
                    + (f", cluster start {one['start_s']:.2f} s" if config != LOCAL else "")
                    + f", {one['tiles']} tiles")
    return summarize(runs, bench.description)


def summarize(runs: list[dict[str, Any]], description: str = "W-MLP-a") -> dict[str, Any]:
    """Medians per configuration, the table and the targets from the raw ``runs`` (see :func:`run`)."""
    figures: dict[str, dict[str, Any]] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        med = {k: statistics.median(r[k] for r in mine) for k in ("evaluate_s", "start_s", "close_s", "stage_s")}
        figures[config] = med | {"points": mine[0]["points"], "tiles": mine[0]["tiles"],
                                 "tile_shape": mine[0]["tile_shape"], "strategy": mine[0]["strategy"],
                                 "points_per_s": mine[0]["points"] / med["evaluate_s"],
                                 "foreign_load": max(r["foreign_load"] for r in mine),
                                 "reruns": sum(r.get("reruns", 0) for r in mine)}
    base = figures.get(ONE, {}).get("evaluate_s", math.nan)
    for f in figures.values():
        f["speedup_vs_one_worker"] = base / f["evaluate_s"]
    one, two, local = (figures.get(c) for c in CONFIGS)
    targets = [
        {"target": f"dask 2 workers × 1 thread ≥ {SPEEDUP:g}× 1 worker × 1 thread (evaluation, cluster start excluded)",
         "met": bool(one["evaluate_s"] / two["evaluate_s"] >= SPEEDUP) if one and two else None,
         "detail": f"{one['evaluate_s'] / two['evaluate_s']:.2f}× ({two['evaluate_s']:.2f} s vs {one['evaluate_s']:.2f} s)"
         if one and two else "missing"},
        {"target": f"dask 2 workers × 1 thread within 15 % of the local backend with 2 threads (≤ {LIMIT:g}× its time)",
         "met": bool(two["evaluate_s"] / local["evaluate_s"] <= LIMIT) if two and local else None,
         "detail": f"{two['evaluate_s'] / local['evaluate_s']:.2f}× ({two['evaluate_s']:.2f} s vs {local['evaluate_s']:.2f} s)"
         if two and local else "missing"},
    ]
    columns = ["configuration", "evaluation s", "points/s", "× 1 worker", "cluster start s", "close s", "stage s",
               "foreign", "reruns"]
    rows = [[c, f"{f['evaluate_s']:.2f}", f"{f['points_per_s']:,.0f}", f"{f['speedup_vs_one_worker']:.2f}",
             "—" if c == LOCAL else f"{f['start_s']:.2f}", "—" if c == LOCAL else f"{f['close_s']:.2f}",
             f"{f['stage_s']:.2f}", f"{f['foreign_load']:.0%}", str(f["reruns"])] for c, f in figures.items()]
    first = next(iter(figures.values()))
    steps = runs[0]["steps"]
    rounds = max(r["round"] for r in runs) + 1
    return {
        "name": NAME,
        "description": f"{description}; the pipeline's evaluate stage on a {steps}×{steps} grid ({first['points']:,} "
                       f"points, {first['tiles']} tiles of {'×'.join(map(str, first['tile_shape']))}, "
                       f"{first['strategy']}), {rounds} alternating round(s), medians",
        "settings": {"steps": steps, "rounds": rounds},
        "runs": runs, "figures": figures, "columns": columns, "rows": rows, "targets": targets,
        "notes": ["evaluation s: tiles submitted, evaluated, written and marked done (dask: the backend's "
                  "compute_seconds, after the cluster started and the workers received the evaluator); stage s: "
                  "the whole stage call, cluster start and close included; foreign: the largest share of the CPUs "
                  "other processes (not this one or its workers) used during a run (after reruns)"],
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import format_study, write_record

    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=STEPS, help="points per axis (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per configuration (default %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"a {QUICK_STEPS}×{QUICK_STEPS} grid, one round")
    p.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    args = p.parse_args(argv)
    study = run(QUICK_STEPS if args.quick else args.steps, 1 if args.quick else args.rounds)
    print(format_study(study))
    if args.out:
        write_record(args.out, study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
