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

Cases: ``mlp-4m`` (an MLP of 4.2 M parameters, the unit test's model, evaluated by the loop);
``gpt2-92m`` (``transformers``' ``GPT2LMHeadModel``, 12 layers, width 768, vocabulary 8192: 91 M
parameters, 4 sequences × 64 tokens, the model's own next-token loss); ``pipeline-mlp-17m`` (the
pipeline's evaluate stage, see :func:`pipeline_child`: its peak above the process before the
stage, which then loads everything itself; allowance ``STORE_CHUNKS`` more). Linux only (``/proc``).
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

STAGED = ("mlp-4m", "gpt2-92m")  # built in the process, then evaluated: before and forward measured apart
CASES = (*STAGED, "pipeline-mlp-17m")
#: What ``evaluate`` may hold beyond the origin and one forward's working space (freed activations
#: kept for reuse, see landscapes.allocator), in model units: the target is total ≤ 4 + forward + SLACK.
SLACK = 0.3
#: The pipeline's stage also reads and writes the directions a chunk at a time (2**20 parameters of
#: each direction, and its encoded copy): a fixed allowance, whatever the model's size.
STORE_CHUNKS = 24 << 20
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


def pipeline_child(steps: int = 5) -> dict[str, Any]:
    """The pipeline's evaluate stage (``pipelines.stages.evaluate``) on the demo MLP widened to
    4096 × 4096 (17.1 M parameters; ``compute.strategy=loop``, what ``auto`` takes for
    transformers and CNNs on a CPU: a Sequential MLP would be batched), its directions made by the directions stage into a
    Zarr store: the peak while the stage loads the checkpoint and the directions and evaluates
    a 5×5 plane into the landscape store, above the process before it (nothing of the model alive)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from hydra import compose, initialize_config_dir

    from landscapes.store import LandscapeStore
    from pipelines.config import register_configs, to_typed
    from pipelines.demo import DemoMLP
    from pipelines.stages.directions import DirectionsInputs, directions
    from pipelines.stages.evaluate import EvaluateInputs, evaluate

    torch.set_num_threads(int(os.environ.get("LANDSCAPES_BENCH_THREADS", "2")))
    root = Path(__file__).resolve().parents[1]
    register_configs()

    def stage(tmp: str, hidden: tuple[int, ...]) -> tuple[Callable[[], Any], int]:
        """The evaluate stage, ready to run, on a fresh checkpoint and directions store; and n."""
        os.environ["LANDSCAPES_ROOT"] = tmp
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
            raw = compose("config", overrides=[
                f"paths.output_dir={tmp}/out", f"model.hidden=[{','.join(map(str, hidden))}]", "data.limit=64",
                "compute.strategy=loop", f"grid.steps={steps}"])
        cfg = to_typed(raw)
        torch.manual_seed(0)
        model = DemoMLP(hidden=hidden)
        n = sum(p.numel() for p in model.parameters())
        checkpoint = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), checkpoint)
        made = directions(cfg, DirectionsInputs(checkpoint=checkpoint, out_dir=Path(tmp)))
        inputs = EvaluateInputs(checkpoint=checkpoint, directions=made.path, store=Path(tmp) / "landscape.zarr",
                                fingerprint="memory")
        return lambda: evaluate(cfg, inputs), n

    with tempfile.TemporaryDirectory() as tmp:
        stage(tmp, (8,))[0]()  # the runtime: imports (scikit-learn, zarr...), kernels, lazy initialization
    with tempfile.TemporaryDirectory() as tmp:
        run, params = stage(tmp, (4096, 4096))
        trim()
        bare = status_bytes("VmRSS")
        if not reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs refused)")
        started = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - started
        peak = status_bytes("VmHWM")
        store = LandscapeStore.open(out.store, mode="r")
        finite = all(bool(np.isfinite(store.read(name)).all()) for name in store.metrics)
    unit = 4 * params
    return {"case": "pipeline-mlp-17m", "parameters": params, "model_mib": unit / 2**20, "strategy": out.strategy,
            "points": out.points, "seconds": seconds, "finite": finite, "before": 0.0, "forward": 0.0,
            "engine": (peak - bare) / unit, "total": (peak - bare) / unit}


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


COLUMNS = ["case", "parameters", "fp32 size", "strategy", "before (model + data + 2 dirs)", "one forward",
           "engine peak", "total peak", "working space (total − 4)", "target", "seconds"]


def judge(case: str, r: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The table row of one case's record and its target check (see the module's docstring)."""
    allowance = r["forward"] + SLACK + (0 if case in STAGED else STORE_CHUNKS / (4 * r["parameters"]))
    met = bool(r["total"] <= 4 + allowance and r["finite"])
    before, forward = (f"{r['before']:.2f}×", f"+{r['forward']:.2f}×") if case in STAGED else ("—", "—")
    row = [case, f"{r['parameters'] / 1e6:.1f} M", f"{r['model_mib']:.0f} MiB", r["strategy"], before, forward,
           f"+{r['engine']:.2f}×", f"{r['total']:.2f}×", f"{r['total'] - 4:+.2f}×", "met" if met else "missed",
           f"{r['seconds']:.1f}"]
    target = {"target": f"{case}: total peak ≤ 4 + one forward + {SLACK:g} model sizes"
                        + ("" if case in STAGED else f" (+ {STORE_CHUNKS >> 20} MiB of store chunks)"),
              "met": met, "detail": f"{r['total']:.2f}× ≤ {4 + allowance:.2f}×" if met
              else f"{r['total']:.2f}× > {4 + allowance:.2f}×" + ("" if r["finite"] else ", values not finite")}
    return row, target


def study(cases: tuple[str, ...] = CASES, steps: int = 5, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``cases`` (each in a fresh interpreter); the JSON-able study record of ``W-BIG``.

    ``gpt2-92m`` is skipped, with a note, when ``transformers`` is not installed.
    """
    import importlib.util

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    records, rows, targets, notes = [], [], [], []
    for case in cases:
        if case == "gpt2-92m" and importlib.util.find_spec("transformers") is None:
            notes.append("gpt2-92m skipped: transformers is not installed (pip install -e '.[models]')")
            continue
        r = measure(case, steps)
        row, target = judge(case, r)
        records.append(r)
        rows.append(row)
        targets.append(target)
        log(f"  {case}: total peak {r['total']:.2f}× the model, {r['seconds']:.1f} s")
    return {
        "name": "W-BIG",
        "description": f"large models in bounded memory (benchmarks.memory): peak resident memory of evaluate on a "
                       f"{steps}×{steps} plane, each case in a fresh process, in units of the model's fp32 size",
        "settings": {"cases": list(cases), "steps": steps, "slack": SLACK, "store_chunks": STORE_CHUNKS},
        "runs": records, "columns": COLUMNS, "rows": rows, "targets": targets, "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of %(default)s")
    p.add_argument("--steps", type=int, default=5, help="grid points per axis (default 5)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run = pipeline_child if args.child == "pipeline-mlp-17m" else lambda steps: child(args.child, steps)
        print(json.dumps(run(args.steps)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for case in cases:
        row, _ = judge(case, measure(case, args.steps))
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
