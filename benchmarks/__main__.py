"""``python -m benchmarks``: run the suite, print the table, write the JSON record.

The suite is the workload groups (contenders timed on one grid, below) and the study groups
``W-BIG``, ``growth`` and ``scaling`` (``benchmarks.memory``, ``benchmarks.growth``,
``benchmarks.scaling``: their own measurements, rounds and targets; ``--repeats`` does not apply
to them). By default every group runs, each in a fresh process, and one record holds them all.

Every contender of a workload runs once per repeat, in a fixed round-robin order, so machine
noise hits all of them alike; one untimed warm-up round on a 3×3 grid comes first. A run
during which other processes kept more than ``--max-foreign`` of the CPUs busy waits for the
machine to quiet down and runs again (at most ``--retries`` times; the record keeps count).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import measure
from benchmarks.contenders import Contender, all_contenders, make_directions
from benchmarks.report import (
    LOOP,
    ContenderResult,
    WorkloadResult,
    format_table,
    load_json,
    max_relative_difference,
    write_json,
)
from benchmarks.workloads import (
    STUDY_GROUPS,
    WORKLOAD_GROUPS,
    Sizes,
    Workload,
    build_workloads,
    precision_context,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_GROUPS + STUDY_GROUPS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per contender (default 5, 1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (a few minutes on 2 idle cores): 11×11 MLP grids, 5×5 CNN, LM and GPU "
        "grids, 8 LM sequences, 5,000 GPU images, each strategy at its own tile size only, 1 repeat; "
        "W-BIG: mlp-4m and pipeline-mlp-17m on 3×3; growth: 11², 21², 41²; scaling: 31×31; 1 round each",
    )
    p.add_argument(
        "--memory-cases",
        default=None,
        help="W-BIG cases (default all: mlp-4m,gpt2-92m,pipeline-mlp-17m; with --quick all but gpt2-92m)",
    )
    p.add_argument(
        "--memory-steps", type=int, default=None, help="W-BIG grid points per axis (default 5; 3 with --quick)"
    )
    p.add_argument(
        "--growth-steps",
        default=None,
        help="growth grid sizes, points per axis (default 41,101,201; 11,21,41 with --quick)",
    )
    p.add_argument(
        "--scaling-steps", type=int, default=None, help="scaling grid points per axis (default 101; 31 with --quick)"
    )
    p.add_argument(
        "--gpu-steps",
        type=int,
        default=None,
        help="W-GPU ResNet-56 grid points per axis (default 51; 5 with --quick)",
    )
    p.add_argument(
        "--gpu-images",
        type=int,
        default=None,
        help="W-GPU synthetic images (default 50,000; 5,000 with --quick)",
    )
    p.add_argument(
        "--precisions",
        default=None,
        help="comma-separated precisions (fp32, tf32, bf16) to run every workload in, e.g. "
        "fp32,bf16: each precision's speed and its max relative difference from fp32 "
        "(contender by contender; tf32 on CUDA workloads only). Default: each workload's own",
    )
    p.add_argument(
        "--lm-steps",
        type=int,
        default=None,
        help="W-LM grid points per axis (default 21; 5 with --quick)",
    )
    p.add_argument(
        "--lm-sequences",
        type=int,
        default=None,
        help="W-LM sequences of 128 tokens (default 64; 8 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: the usable cores, %(default)s)",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=None,
        help="rerun a timing when other processes used more than this share of the "
        "CPUs meanwhile (default 0.1; 1, the --quick default, disables)",
    )
    p.add_argument(
        "--retries", type=int, default=3, help="reruns per timing at most (default %(default)s)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait for a quiet machine before a rerun (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/<timestamp>.json)",
    )
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run every workload in this process (default: each workload group in a fresh "
        "process of its own, so no workload inherits another's heap)",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.max_foreign is None:
        args.max_foreign = 1.0 if args.quick else 0.1
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: need at least one timed run")
    groups = WORKLOAD_GROUPS + STUDY_GROUPS
    unknown = [n.strip() for n in args.workloads.split(",") if n.strip() and n.strip() not in groups]
    if unknown:
        p.error(f"--workloads: unknown group(s) {', '.join(unknown)}; choose from {', '.join(groups)}")
    if args.memory_cases is not None:
        from benchmarks.memory import CASES

        args.memory_cases = tuple(c.strip() for c in args.memory_cases.split(",") if c.strip())
        bad = [c for c in args.memory_cases if c not in CASES]
        if bad or not args.memory_cases:
            p.error(f"--memory-cases={','.join(args.memory_cases)}: choose from {', '.join(CASES)}")
    if args.growth_steps is not None:
        try:
            args.growth_steps = tuple(int(s) for s in args.growth_steps.split(",") if s.strip())
        except ValueError:
            args.growth_steps = ()
        if len(set(args.growth_steps)) < 2 or min(args.growth_steps) < 2:
            p.error("--growth-steps: give two grid sizes or more, each at least 2 points per axis, e.g. 41,201")
    if args.precisions is not None:
        args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
        bad = [x for x in args.precisions if x not in PRECISIONS]
        if bad or not args.precisions:
            p.error(f"--precisions={','.join(args.precisions)}: choose from {', '.join(PRECISIONS)}")
    return args


PRECISIONS = ("fp32", "tf32", "bf16")


def _by_precision(workloads: list[Workload], precisions: list[str] | None, notes: list[str]) -> list[Workload]:
    """Each workload once per precision (fp32 first, the reference), named ``W [p]``."""
    if not precisions:
        return workloads
    order = sorted(set(precisions), key=PRECISIONS.index)
    out = []
    for w in workloads:
        for prec in order:
            if prec == "tf32" and w.device.type != "cuda":
                notes.append(f"{w.name} [tf32] skipped: TF32 is CUDA only")
                continue
            out.append(dataclasses.replace(w, name=f"{w.name} [{prec}]", precision=prec))
    return out


def _compare_with_fp32(results: list[WorkloadResult], values: dict[str, dict[str, np.ndarray]]) -> None:
    """Each contender's max relative difference from the same contender in fp32 on the same workload."""
    for r in results:
        base = r.name.rsplit(" [", 1)[0]
        reference = values.get(f"{base} [fp32]")
        if reference is None or r.name.endswith("[fp32]"):
            continue
        for c in r.contenders:
            if c.name in values.get(r.name, {}) and c.name in reference:
                c.max_rel_diff_vs_fp32 = max_relative_difference(values[r.name][c.name], reference[c.name])


def _engine_available() -> str | None:
    """None when ``landscapes.evaluate`` imports, otherwise why not."""
    try:
        import landscapes

        landscapes.evaluate  # noqa: B018 - the attribute is the check
    except Exception as exc:  # noqa: BLE001 - any import failure means "not yet"
        return f"{type(exc).__name__}: {exc}"
    return None


def _peak_gflops(device: torch.device) -> dict[str, float]:
    """Measured square-matmul throughput per precision on ``device``."""
    if device.type == "cpu":
        return {"cpu fp32": measure.matmul_gflops(device)}
    return {
        "cuda fp32": measure.matmul_gflops(device),
        "cuda tf32": measure.matmul_gflops(device, tf32=True),
        "cuda bf16": measure.matmul_gflops(device, dtype=torch.bfloat16),
    }


def _peak_key(w: Workload) -> str:
    return "cpu fp32" if w.device.type == "cpu" else f"cuda {w.precision}"


def _cleanup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fallback(c: Contender, info: dict[str, Any]) -> str | None:
    """Why an engine contender is redundant: it resolved to another strategy than it asked for."""
    asked = getattr(c, "strategy", "auto")
    got = info.get("strategy")
    if asked != "auto" and got is not None and got != asked:
        return f"falls back to {got}: {info.get('strategy_reason', '')}".rstrip(": ")
    return None


def _duplicate(r: ContenderResult, resolved: dict[tuple[Any, ...], str]) -> str | None:
    """``"same as X"`` when an earlier engine contender resolved to the same strategy, tile
    and pass size, compiled or not (a requested tile above the engine's cap, say), so timing it
    again adds nothing."""
    if "strategy" not in r.info:
        return None
    compiled = str(r.info.get("compile", "")).startswith("on")
    key = (r.info["strategy"], r.info.get("tile_points"), r.info.get("pass_points"), compiled)
    if key in resolved:
        return f"same as {resolved[key]}"
    resolved[key] = r.name
    return None


@dataclasses.dataclass(frozen=True)
class Policy:
    """How runs disturbed by other processes are handled."""

    max_foreign: float = 0.1
    retries: int = 3
    quiet_wait: float = 120.0


def _timed_run(
    c: Contender, w: Workload, directions: Any, policy: Policy, log: Callable[[str], None], largest: int | None
) -> tuple[Any, measure.Timing, int]:
    """One timed run of ``c``, rerun after a quiet spell when other processes disturbed it."""
    for attempt in range(policy.retries + 1):
        try:
            out, timing = measure.timed(lambda: c.run(w, directions), w.device, largest)
        finally:
            _cleanup(w.device)
        if not timing.foreign_load > policy.max_foreign or attempt == policy.retries:
            return out, timing, attempt
        waited = measure.wait_for_quiet(policy.max_foreign, policy.quiet_wait)
        log(
            f"    other processes used {timing.foreign_load:.0%} of the CPUs; "
            f"waited {waited:.0f} s, running again"
        )
    raise AssertionError("unreachable")


def run_workload(
    w: Workload,
    contenders: list[Contender],
    repeats: int,
    policy: Policy,
    log: Callable[[str], None],
    keep: dict[str, np.ndarray] | None = None,
) -> WorkloadResult:
    """Warm up, then time every contender ``repeats`` times, alternating between them.

    The result is not finished (see :meth:`WorkloadResult.finish`): the matmul throughput it
    is compared with is the best measured over the whole run. ``keep`` receives each
    contender's values on the grid.
    """
    flops = measure.forward_flops(
        w.model, w.inputs, lambda: precision_context(w.precision, w.device)
    )
    largest = measure.largest_activation(w.model, w.inputs) if w.device.type == "cpu" else None
    result = WorkloadResult(
        w.name,
        w.description,
        str(w.device),
        w.precision,
        w.steps,
        w.points,
        len(w.inputs),
        flops,
        _peak_gflops(w.device)[_peak_key(w)],
        w.tolerance,
        [ContenderResult(c.name) for c in contenders],
    )
    try:
        directions = make_directions(w.model)
    except Exception as exc:  # noqa: BLE001 - only the contenders that need them fail
        why = f"directions failed: {type(exc).__name__}: {exc}".splitlines()[0]
        log(f"  {why}")
        directions = []
        for c, r in zip(contenders, result.contenders, strict=True):
            if c.same_directions:
                r.error = why
    warm = dataclasses.replace(w, steps=3)
    values: dict[str, np.ndarray] = {}
    resolved: dict[tuple[Any, ...], str] = {}  # (strategy, tile, pass points) -> first contender
    checked: set[str] = set()
    with measure.ForeignLoad() as load:
        for rep in range(-1, repeats):  # -1: untimed warm-up on a 3×3 grid
            for c, r in zip(contenders, result.contenders, strict=True):
                if r.error or r.skipped:
                    continue
                try:
                    if rep < 0:
                        r.info = c.run(warm, directions).info
                        r.skipped = _fallback(c, r.info)
                        # a tile size below the warm-up grid's size cannot have been clamped to it
                        if not r.skipped and r.info.get("tile_points", warm.points) < warm.points:
                            r.skipped = _duplicate(r, resolved)
                            checked.add(r.name)
                        continue
                    out, timing, reruns = _timed_run(c, w, directions, policy, log, largest)
                    if r.name not in checked:
                        r.info = out.info
                        r.skipped = _duplicate(r, resolved)
                        checked.add(r.name)
                        if r.skipped:
                            continue
                except Exception as exc:  # noqa: BLE001 - record, keep the others going
                    r.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    log(f"  {c.name}: {r.error}")
                    traceback.print_exc(file=sys.stderr)
                    continue
                r.info = out.info
                r.times_s.append(timing.seconds)
                r.cpu_s.append(timing.cpu_seconds)
                r.peak_bytes.append(timing.peak_bytes)
                r.minor_faults.append(timing.minor_faults)
                r.foreign_load.append(timing.foreign_load)
                r.reruns += reruns
                if c.same_directions:
                    values[c.name] = out.values
                log(f"  [{rep + 1}/{repeats}] {c.name}: {timing.seconds:.3f} s")
    result.foreign_load = load.fraction
    if keep is not None:
        keep.update(values)
    loop = values.get(LOOP)
    for r in result.contenders:
        if loop is not None and r.name in values and r.name != LOOP:
            r.max_rel_diff_vs_loop = max_relative_difference(values[r.name], loop)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started, t0 = dt.datetime.now(), time.perf_counter()
    out = args.out or Path("benchmarks/results") / f"{started:%Y%m%dT%H%M%S}.json"
    policy = Policy(args.max_foreign, args.retries, args.quiet_wait)
    machine = measure.machine_info()  # before the runs: it hashes the engine's sources

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if len(names) > 1 and not args.same_process:
        return _one_process_per_group(args, names, out, argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    sizes = dataclasses.replace(
        sizes,
        gpu_steps=args.gpu_steps or sizes.gpu_steps,
        gpu_images=args.gpu_images or sizes.gpu_images,
        lm_steps=args.lm_steps or sizes.lm_steps,
        lm_sequences=args.lm_sequences or sizes.lm_sequences,
        memory_cases=args.memory_cases or sizes.memory_cases,
        memory_steps=args.memory_steps or sizes.memory_steps,
        growth_steps=args.growth_steps or sizes.growth_steps,
        scaling_steps=args.scaling_steps or sizes.scaling_steps,
    )
    workloads, notes = build_workloads([n for n in names if n not in STUDY_GROUPS], sizes)
    workloads = _by_precision(workloads, args.precisions, notes)
    missing = _engine_available()
    if missing:
        notes.append(f"engine skipped: landscapes.evaluate is not importable ({missing})")
    peak = _peak_gflops(torch.device("cpu"))
    if any(w.device.type == "cuda" for w in workloads):
        peak |= _peak_gflops(torch.device("cuda"))
    results = []
    values: dict[str, dict[str, np.ndarray]] = {}
    for w in workloads:
        log(f"{w.name}: {w.description}")
        contenders = all_contenders(w, with_engine=not missing, quick=args.quick)
        results.append(run_workload(w, contenders, args.repeats, policy, log, keep=values.setdefault(w.name, {})))
    studies = []
    for name in (n for n in names if n in STUDY_GROUPS):
        log(f"{name}:")
        studies.append(run_study(name, sizes, log, policy))
    _compare_with_fp32(results, values)
    # compare with the best throughput measured at any time in the run (the machine's ability)
    for r in results:
        key = "cpu fp32" if r.device == "cpu" else f"cuda {r.precision}"
        peak[key] = max(peak[key], r.peak_gflops)
    for r in results:
        r.peak_gflops_before = r.peak_gflops
        r.peak_gflops = peak["cpu fp32" if r.device == "cpu" else f"cuda {r.precision}"]
        r.finish()
    header: dict[str, Any] = {
        "created": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "repeats": args.repeats,
        "sizes": dataclasses.asdict(sizes),
        "policy": dataclasses.asdict(policy),
        "machine": machine,
        "matmul_gflops": peak,
        "notes": notes,
        "wall_s": round(time.perf_counter() - t0, 1),
        "studies": studies,
    }
    print(format_table(results, header))
    write_json(out, header, results)
    print(f"\nwrote {out}")
    return 0


def run_study(name: str, sizes: Sizes, log: Callable[[str], None], policy: Policy = Policy(1.0, 0)) -> dict[str, Any]:
    """Run the study group ``name`` (``W-BIG``, ``growth``, ``scaling``) at ``sizes``; its JSON-able record.

    ``growth`` and ``scaling`` rerun disturbed timings by ``policy``, as the workloads do; ``W-BIG``
    measures memory, which other processes do not disturb."""
    rerun = dataclasses.asdict(policy)
    if name == "W-BIG":
        from benchmarks import memory

        return memory.study(tuple(sizes.memory_cases), sizes.memory_steps, log=log)
    if name == "growth":
        from benchmarks import growth

        return growth.run(tuple(sizes.growth_steps), sizes.growth_rounds, log=log, **rerun)
    if name == "scaling":
        from benchmarks import scaling

        return scaling.run(sizes.scaling_steps, sizes.scaling_rounds, log=log, **rerun)
    raise ValueError(f"run_study: {name!r} is not a study group; choose from {', '.join(STUDY_GROUPS)}")


def _one_process_per_group(args: argparse.Namespace, names: list[str], out: Path, argv: list[str] | None) -> int:
    """Run each workload group in a fresh ``python -m benchmarks --same-process``, then merge.

    How fast a forward pass runs on a CPU depends on the heap it inherits: glibc gives freed
    activations back to the kernel or not depending on what else lives on the heap (W-CNN:
    7,200 page faults per point for a plain loop in a fresh process, 8 after the MLP
    workloads had run in the same one). A fresh process per group is what a user running one
    landscape gets.
    """
    started = time.perf_counter()
    parts: list[tuple[dict[str, Any], list[WorkloadResult]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            part = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable, "-m", "benchmarks", "--same-process", "--workloads", name, "--out", str(part),
                "--repeats", str(args.repeats), "--threads", str(args.threads), "--max-foreign", str(args.max_foreign),
                "--retries", str(args.retries), "--quiet-wait", str(args.quiet_wait),
            ]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--gpu-steps", str(args.gpu_steps)] if args.gpu_steps else []
            cmd += ["--gpu-images", str(args.gpu_images)] if args.gpu_images else []
            cmd += ["--precisions", ",".join(args.precisions)] if args.precisions else []
            cmd += ["--lm-steps", str(args.lm_steps)] if args.lm_steps else []
            cmd += ["--lm-sequences", str(args.lm_sequences)] if args.lm_sequences else []
            cmd += ["--memory-cases", ",".join(args.memory_cases)] if args.memory_cases else []
            cmd += ["--memory-steps", str(args.memory_steps)] if args.memory_steps else []
            cmd += ["--growth-steps", ",".join(map(str, args.growth_steps))] if args.growth_steps else []
            cmd += ["--scaling-steps", str(args.scaling_steps)] if args.scaling_steps else []
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)  # its log goes to stderr
            if proc.returncode != 0 or not part.exists():
                print(f"{name}: its process failed (exit {proc.returncode}); see the log above", file=sys.stderr)
                return proc.returncode or 1
            parts.append(load_json(part))
    header = dict(parts[0][0])
    header["command"] = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    header["processes"] = "one fresh process per workload group"
    header["notes"] = [n for h, _ in parts for n in h.get("notes", [])]
    header["studies"] = [st for h, _ in parts for st in h.get("studies", [])]
    header["wall_s"] = round(time.perf_counter() - started, 1)
    peaks: dict[str, float] = {}
    for h, _ in parts:
        for key, value in h["matmul_gflops"].items():
            peaks[key] = max(peaks.get(key, 0.0), value)
    header["matmul_gflops"] = peaks
    results = [r for _, rs in parts for r in rs]
    for r in results:  # compare every workload with the best throughput measured in any process
        r.peak_gflops = peaks["cpu fp32" if r.device == "cpu" else f"cuda {r.precision}"]
        r.finish()
    print(format_table(results, header))
    write_json(out, header, results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
