"""Focused W-CNN timing for the batched CNN plan (issue 15): the default against the loops,
with the pass size and the convolutions' memory format varied.

``python -m benchmarks.cnn_passes --steps 41 --repeats 3``: every contender runs once per
round, in a fixed round-robin order, so a busy machine hits them alike; each round also
measures the fp32 matmul throughput, and "% matmul" divides each round's FLOP rate by that
round's matmul figure (medians over the rounds). One thread count for all (torch's default).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import landscapes
from benchmarks import measure
from benchmarks.contenders import PerPointLoop, make_directions
from benchmarks.workloads import Workload, _cnn_workloads


def _engine(strategy: str, passes: int | None = None, channels_last: bool = True) -> Callable[[Workload, Any], np.ndarray]:
    """``landscapes.evaluate``; ``passes`` forces that many points per batched pass on a CPU."""

    def run(w: Workload, dirs: Any) -> np.ndarray:
        from landscapes import batched
        ev = importlib.import_module("landscapes.evaluate")

        saved = ev.CPU_BATCHED_MAX_POINT_BYTES, ev.CPU_BATCHED_TILE_BYTES, ev.CPU_BATCHED_CONV_POINTS, batched._CL
        kwargs: dict[str, Any] = {"strategy": strategy}
        if passes is not None:
            ev.CPU_BATCHED_MAX_POINT_BYTES = ev.CPU_BATCHED_TILE_BYTES = ev.CPU_BATCHED_CONV_POINTS = 1 << 40
            kwargs.update(max_batch_points=passes, memory_budget=16 << 30)
        if not channels_last:
            batched._CL = torch.contiguous_format
        try:
            land = landscapes.evaluate(w.model, landscapes.Loss(nn.CrossEntropyLoss(), w.inputs, w.targets), dirs, w.axes, **kwargs)
        finally:
            ev.CPU_BATCHED_MAX_POINT_BYTES, ev.CPU_BATCHED_TILE_BYTES, ev.CPU_BATCHED_CONV_POINTS, batched._CL = saved
        if passes is not None:
            print(f"  {strategy} passes of {land.metadata['pass_points']} (asked {passes}), tiles {land.metadata['tile_shape']}")
        return np.asarray(land.values["loss"], dtype=np.float64)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--contenders", default="engine-loop,batched,batched-nchw,batched-4",
        help="comma-separated: loop (plain per-point loop; run it first: after the engine it "
        "inherits a grown glibc threshold), engine-loop, default (auto), batched (its own "
        "passes), batched-nchw (the same without channels-last), batched-<m> (m points per pass)",
    )
    args = parser.parse_args()
    device = torch.device("cpu")
    (w,) = _cnn_workloads(device, args.steps)
    dirs = make_directions(w.model)
    flops = measure.forward_flops(w.model, w.inputs, contextlib.nullcontext)
    all_contenders = {
        "loop": lambda w, d: PerPointLoop().run(w, d).values,
        "engine-loop": _engine("loop"),
        "default": _engine("auto"),
        "batched": _engine("batched"),
        "batched-nchw": _engine("batched", channels_last=False),
    }
    names = list(dict.fromkeys(args.contenders.split(",")))
    for n in names:  # batched-<m>: m points per pass; batched-nchw-<m>: the same without channels-last
        if n.startswith("batched-") and n.rsplit("-", 1)[1].isdigit():
            all_contenders[n] = _engine("batched", passes=int(n.rsplit("-", 1)[1]), channels_last="nchw" not in n)
    times: dict[str, list[float]] = {n: [] for n in names}
    fractions: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, np.ndarray] = {}
    peaks = []
    for _ in range(args.repeats):
        peak = measure.matmul_gflops(device)
        peaks.append(peak)
        for n in names:
            start = time.perf_counter()
            values[n] = all_contenders[n](w, dirs)
            t = time.perf_counter() - start
            times[n].append(t)
            fractions[n].append(flops * w.points / t / (peak * 1e9))
    print(f"W-CNN {args.steps}×{args.steps}, {flops / 1e6:,.1f} MFLOP/point, matmul GFLOP/s per round {[round(p) for p in peaks]}")
    ref = values["loop"] if "loop" in values else values[names[0]]
    print("| contender | median s | × loop | % matmul | max rel diff vs loop |")
    base = statistics.median(times["loop"]) if "loop" in times else float("nan")
    for n in names:
        med = statistics.median(times[n])
        diff = float(np.max(np.abs(values[n] - ref) / np.abs(ref)))
        print(f"| {n} | {med:.2f} | {base / med:.2f} | {100 * statistics.median(fractions[n]):.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
