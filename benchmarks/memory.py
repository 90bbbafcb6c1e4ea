"""``python -m benchmarks.memory``: the peak resident memory of ``landscapes.evaluate`` on large models.

Each case runs in a fresh Python process (``--child``), so earlier cases leave nothing behind.
The child first evaluates a tiny model of the same kind (the imports, kernels and lazy
initialization: the runtime, not the model), reads its resident set size (``VmRSS``), builds
the model, its data and two ``random_direction`` dicts as a user does, reads ``VmRSS`` again,
resets the peak (``VmHWM``, through ``/proc/self/clear_refs``), runs one plain forward
(``torch.no_grad``) and reads the peak, then resets it again, evaluates a 5×5 plane with the
default strategy and reads the peak. glibc's free heap memory is given back (``malloc_trim``)
before each baseline. Every figure is in units of the model's fp32 size (4 bytes per parameter):

- ``before``: what the model, its data and the two directions hold (ideally 3);
- ``forward``: the peak of one plain forward above that (working space any evaluation needs);
- ``engine``: the peak during ``evaluate`` above ``before`` (the origin and working space);
- ``total``: ``before`` + ``engine``. Four copies (model, origin, two directions) are 4; the
  target is ``total ≤ 4 + forward + SLACK``: beyond them, one forward's working space and freed
  activations kept for reuse, no other copy of the parameters or directions.

Cases: ``mlp-4m`` (an MLP of 4.2 M parameters, the unit test's model, evaluated by the loop) and ``gpt2-92m``
(``transformers``' ``GPT2LMHeadModel``, 12 layers, width 768, vocabulary 8192: 92 M parameters,
4 sequences × 64 tokens, the model's own next-token loss). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CASES = ("mlp-4m", "gpt2-92m")
#: What ``evaluate`` may hold beyond the origin and one forward's working space (freed activations
#: kept for reuse, see landscapes.allocator), in model units: the target is total ≤ 4 + forward + SLACK.
SLACK = 0.3
GPT2_WIDE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 8192, "n_positions": 64}


def status_bytes(field: str) -> int:
    """``field`` (``VmRSS``, ``VmHWM``) of this process's ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; this measurement needs Linux.")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Give glibc's free heap memory back to the system (``malloc_trim``), so RSS counts live data."""
    from landscapes.allocator import _libc

    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class MLP(nn.Module):
    """1024 → 2048 → 1024 → 10 with ReLUs (4.2 M parameters); not an ``nn.Sequential``, so the
    default strategy on a CPU is the loop, as for transformers and CNNs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(1024, 2048), nn.Linear(2048, 1024), nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _mlp_case(small: bool = False) -> tuple[nn.Module, Any, Callable[[], Any]]:
    """The model, its metric and a plain forward on its data; ``small``: a tiny one of the same kind."""
    import landscapes as L

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4)) if small else MLP()
    x, y = torch.randn(16, 8 if small else 1024), torch.randint(0, 4, (16,))
    return model, L.Loss(nn.CrossEntropyLoss(), x, y), lambda: model(x)


def _gpt2_case(small: bool = False) -> tuple[nn.Module, Any, Callable[[], Any]]:
    """The model, its metric and a plain forward on its data; ``small``: a tiny one of the same kind."""
    import landscapes as L
    from benchmarks.workloads import _transformers

    tr = _transformers()
    if tr is None:
        raise ImportError("transformers is not installed (pip install -e '.[models]')")
    torch.manual_seed(0)
    config = {**GPT2_WIDE, **({"n_layer": 1, "n_embd": 24, "vocab_size": 64} if small else {})}
    model = tr.GPT2LMHeadModel(tr.GPT2Config(**config, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, config["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, L.ModelLoss([batch], shift=True), lambda: model(**batch)


def child(case: str, steps: int = 5) -> dict[str, Any]:
    """Measure one case in this process (see the module's docstring)."""
    import numpy as np

    import landscapes as L

    torch.set_num_threads(int(os.environ.get("LANDSCAPES_BENCH_THREADS", "2")))
    build = {"mlp-4m": _mlp_case, "gpt2-92m": _gpt2_case}[case]
    model, metric, _ = build(small=True)  # load the runtime: imports, kernels, lazy initialization
    L.evaluate(model, metric, [L.random_direction(model, seed=s) for s in (1, 2)], [[-1.0, 1.0]] * 2)
    del model, metric
    trim()
    bare = status_bytes("VmRSS")
    model, metric, forward = build()
    dirs = [L.random_direction(model, seed=s) for s in (1, 2)]
    params = sum(p.numel() for p in model.parameters())
    unit = 4 * params
    trim()  # building the directions freed temporaries: give them back before the baseline
    built = status_bytes("VmRSS")
    if not reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs refused)")
    with torch.no_grad():
        forward()
    plain = status_bytes("VmHWM") - built
    trim()
    reset_peak()
    started = time.perf_counter()
    land = L.evaluate(model, metric, dirs, [np.linspace(-1, 1, steps)] * 2)
    seconds = time.perf_counter() - started
    peak = status_bytes("VmHWM")
    values = next(iter(land.values.values()))
    return {
        "case": case, "parameters": params, "model_mib": unit / 2**20, "strategy": land.metadata["strategy"],
        "points": steps * steps, "seconds": seconds, "finite": bool(np.isfinite(values).all()),
        "before": (built - bare) / unit, "forward": plain / unit, "engine": (peak - built) / unit,
        "total": (peak - bare) / unit,
    }


def measure(case: str, steps: int = 5, timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`child` for ``case`` in a fresh interpreter and return its record."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", case, "--steps", str(steps)],
        capture_output=True, text=True, env=env, cwd=root, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.memory: case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of %(default)s")
    p.add_argument("--steps", type=int, default=5, help="grid points per axis (default 5)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print("| case | parameters | fp32 size | strategy | before (model + data + 2 dirs) | one forward | "
          "engine peak | total peak | working space (total − 4) | target | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        r = measure(case, args.steps)
        ok = "met" if r["total"] <= 4 + r["forward"] + SLACK and r["finite"] else "missed"
        print(f"| {case} | {r['parameters'] / 1e6:.1f} M | {r['model_mib']:.0f} MiB | {r['strategy']} | "
              f"{r['before']:.2f}× | +{r['forward']:.2f}× | +{r['engine']:.2f}× | {r['total']:.2f}× | "
              f"{r['total'] - 4:+.2f}× | {ok} | {r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
