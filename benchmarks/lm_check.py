"""W-LM at the issue's full size (21×21, 64 sequences × 128 tokens): the per-point loop against
the engine's default only, alternated: ``python -m benchmarks.lm_check [rounds]`` (about 7 min a
round on 2 cores). The full suite's W-LM runs every contender; this checks the headline ratio at
the size the suite's published run shortened to 32 sequences."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks import measure
from benchmarks.contenders import EngineContender, PerPointLoop, make_directions
from benchmarks.workloads import Workload, gpt2_lm, lm_batches


def main(rounds: int = 2) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = gpt2_lm()
    batches = lm_batches(64, torch.device("cpu"))
    ids = torch.cat([b["input_ids"] for b in batches])
    w = Workload("W-LM", "", model, ids, ids.clone(), 21, torch.device("cpu"), batches=batches)
    directions = make_directions(model)
    peak = measure.matmul_gflops(torch.device("cpu"))
    times: dict[str, list[float]] = {"loop": [], "default": []}
    values, info = {}, {}
    for _ in range(rounds):
        for name, contender in (("loop", PerPointLoop()), ("default", EngineContender())):
            with measure.ForeignLoad() as load:
                start = time.perf_counter()
                out = contender.run(w, directions)
                took = time.perf_counter() - start
            times[name].append(took)
            values[name] = out.values
            info = out.info if name == "default" else info
            print(f"{name} {took:.1f} s, foreign {load.fraction:.0%}", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "medians_s": medians,
        "ratio": medians["loop"] / medians["default"],
        "rel_diff": float(np.max(np.abs(values["default"] - values["loop"]) / np.abs(values["loop"]))),
        "matmul_gflops": peak,
        "info": {k: info.get(k) for k in ("strategy", "tile_points", "compile")},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
