"""``python -m benchmarks.growth``: time per grid point as the grid grows (issue 15).

Target: the time per point on a 201×201 grid within 15 % of a 41×41 grid (fixed costs
amortized, no per-tile cost that grows with the grid). Measured on the path a user runs: the
pipeline's evaluate stage (:mod:`benchmarks.stage_bench`) on W-MLP-a, the engine's default
strategy and tile size, each tile written to the landscape's Zarr store and marked done, a fresh
store per run. One untimed warm-up run at the smallest size first; then ``rounds`` rounds, each
running every size once (the order rotates from round to round, so no size always runs first);
medians over the rounds. Two figures per run: the whole stage call (checkpoint, data and
directions loaded, the store created, the tiles) and the evaluation alone (the backend's seconds:
tiles evaluated, written and marked done). A time per point at the largest size at most 1.15× the
smallest's meets the targets; a smaller one (fixed costs amortized over more points) meets them too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import ForeignLoad, until_quiet

#: The issue's sizes (points per axis) and the bound on the ratio of the time per point.
STEPS = (41, 101, 201)
QUICK_STEPS = (11, 21, 41)
LIMIT = 1.15
NAME = "growth"


def run(steps: tuple[int, ...] = STEPS, rounds: int = 3, *, threads: int | None = None, log: Any = None,
        max_foreign: float = 1.0, retries: int = 0, quiet_wait: float = 120.0) -> dict[str, Any]:
    """Time the evaluate stage on ``steps × steps`` grids; return the JSON-able study record.

    Args:
        steps: points per axis, at least two sizes; the targets compare the smallest and largest.
        rounds: timed runs per size (alternating between sizes).
        threads: torch threads of this process (default: as set).
        log: ``print``-like callable for progress (default: stderr).
        max_foreign, retries, quiet_wait: a run during which other processes used more than
            ``max_foreign`` of the CPUs runs again after a quiet spell, ``retries`` times at most
            (``python -m benchmarks``' policy; the default 1.0 never reruns).

    Returns:
        ``{"name", "description", "settings", "runs", "figures", "columns", "rows", "targets", "notes"}``.
    """
    from benchmarks.stage_bench import StageBench

    steps = tuple(sorted(set(int(s) for s in steps)))
    if len(steps) < 2 or rounds < 1:
        raise ValueError(f"growth: need two grid sizes and one round at least, got steps={steps}, rounds={rounds}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(threads)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        bench = StageBench(Path(tmp))
        bench.run(bench.config(steps[0]))  # warm-up: imports, kernels, lazy initialization
        bench.discard()
        for r in range(rounds):
            for s in steps[r % len(steps):] + steps[: r % len(steps)]:
                one = until_quiet(lambda s=s: _one(bench, s), max_foreign, retries, quiet_wait, log) | {"round": r}
                runs.append(one)
                log(f"  [{r + 1}/{rounds}] {s}×{s}: stage {one['stage_s']:.2f} s, evaluation {one['evaluate_s']:.2f} s, "
                    f"{one['tiles']} tiles of {'×'.join(map(str, one['tile_shape']))}")
    return summarize(runs, bench.description, threads=torch.get_num_threads())


def _one(bench: Any, steps: int) -> dict[str, Any]:
    """One timed run of the evaluate stage on a ``steps × steps`` grid."""
    cfg = bench.config(steps)
    with ForeignLoad() as load:
        cpu, start = time.process_time(), time.perf_counter()
        out = bench.run(cfg)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    bench.discard()
    return {"steps": steps, "points": out.points, "stage_s": wall, "evaluate_s": out.seconds, "cpu_s": cpu,
            "tiles": out.tiles_computed, "tile_shape": list(out.tile_shape), "strategy": out.strategy,
            "foreign_load": load.fraction}


def summarize(runs: list[dict[str, Any]], description: str = "W-MLP-a", *, threads: int | None = None) -> dict[str, Any]:
    """Medians per size, the table and the targets from the raw ``runs`` (see :func:`run`)."""
    sizes = sorted({r["steps"] for r in runs})
    figures = {}
    for s in sizes:
        mine = [r for r in runs if r["steps"] == s]
        points, tiles = mine[0]["points"], mine[0]["tiles"]
        stage, evaluate = statistics.median(r["stage_s"] for r in mine), statistics.median(r["evaluate_s"] for r in mine)
        figures[str(s)] = {
            "steps": s, "points": points, "tiles": tiles, "tile_shape": mine[0]["tile_shape"],
            "strategy": mine[0]["strategy"], "stage_s": stage, "evaluate_s": evaluate,
            "stage_us_per_point": 1e6 * stage / points, "evaluate_us_per_point": 1e6 * evaluate / points,
            "ms_per_tile": 1e3 * evaluate / tiles if tiles else float("nan"),
            "fixed_s": stage - evaluate, "foreign_load": max(r["foreign_load"] for r in mine),
            "reruns": sum(r.get("reruns", 0) for r in mine),
        }
    small, large = figures[str(sizes[0])], figures[str(sizes[-1])]
    issue_sizes = (sizes[0], sizes[-1]) == (STEPS[0], STEPS[-1])
    at = "" if issue_sizes else f" (not the issue's {STEPS[0]}² and {STEPS[-1]}²)"
    targets = []
    for key, what in (("stage", "stage call"), ("evaluate", "evaluation (tiles evaluated, written, marked done)")):
        ratio = large[f"{key}_us_per_point"] / small[f"{key}_us_per_point"]
        targets.append({
            "target": f"{what}: time per point at {sizes[-1]}² within 15 % of {sizes[0]}² (≤ {LIMIT:g}×)",
            "met": bool(ratio <= LIMIT),
            "detail": f"{ratio:.2f}× ({large[f'{key}_us_per_point']:.0f} µs vs {small[f'{key}_us_per_point']:.0f} µs){at}",
        })
    columns = ["grid", "points", "tiles", "tile", "strategy", "stage s", "µs/pt stage", "evaluation s",
               "µs/pt evaluation", "ms/tile", "fixed s", "foreign", "reruns"]
    rows = [[f"{f['steps']}×{f['steps']}", f"{f['points']:,}", str(f["tiles"]), "×".join(map(str, f["tile_shape"])),
             f["strategy"], f"{f['stage_s']:.3f}", f"{f['stage_us_per_point']:.0f}", f"{f['evaluate_s']:.3f}",
             f"{f['evaluate_us_per_point']:.0f}", f"{f['ms_per_tile']:.1f}", f"{f['fixed_s']:.3f}",
             f"{f['foreign_load']:.0%}", str(f["reruns"])] for f in figures.values()]
    rounds = len(runs) // len(sizes)
    return {
        "name": NAME,
        "description": f"{description}; the pipeline's evaluate stage (default strategy and tiles, Zarr store) "
                       f"per grid size, {rounds} alternating round(s), medians"
                       + (f", {threads} torch thread(s)" if threads else ""),
        "settings": {"steps": sizes, "rounds": rounds, "threads": threads},
        "runs": runs, "figures": figures, "columns": columns, "rows": rows, "targets": targets,
        "notes": ["fixed s: stage call minus evaluation (checkpoint, data, directions, store creation); "
                  "foreign: the largest share of the CPUs other processes used during a run of that size (after reruns)"],
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import format_study, write_record

    p = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="grid sizes (points per axis), default %(default)s")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per size (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_STEPS}, one round")
    p.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    args = p.parse_args(argv)
    steps = QUICK_STEPS if args.quick else tuple(int(s) for s in args.steps.split(",") if s.strip())
    study = run(steps, 1 if args.quick else args.rounds, threads=args.threads)
    print(format_study(study))
    if args.out:
        write_record(args.out, study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
