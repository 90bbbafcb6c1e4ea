"""``torch.compile`` for the per-point loop's forwards: decided, checked against the eager
forward, or left off with the reason.

The loop writes each point's θ into the model's own parameters in place; a compiled module
reads its parameters as graph inputs, so one compiled graph serves every point. A compile
costs seconds to a minute (inductor generates and builds C++ or Triton kernels), so ``"auto"``
compiles only when the eager forwards are estimated to take longer than
:data:`COMPILE_AFTER_SECONDS`, and every compiled forward is first checked against the eager
one on the same batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

CompileMode = Literal["off", "on", "auto"]
COMPILE_MODES = ("off", "on", "auto")
#: ``"auto"`` compiles when the eager forwards of the whole grid are estimated to take at least
#: this long: compiling a 4-layer GPT-2 took 10–30 s on 2 CPU cores and its forwards then ran
#: about 1.5× faster (docs/benchmarks.md), so a compile pays off from about a minute of forwards.
COMPILE_AFTER_SECONDS = 60.0
#: How far a compiled forward may differ from the eager one on the check batch, as
#: max |compiled − eager| / max |eager| over every output tensor (reductions reorder).
TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 5e-2}


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output: a tensor, a tuple/list, a mapping or a
    ``ModelOutput``/dataclass, nested."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        items: Any = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        return []
    return [t for item in items for t in output_tensors(item)]


def relative_difference(got: Any, want: Any) -> float:
    """max |got − want| / max |want| over the outputs' tensors (inf when their structure differs)."""
    a, b = output_tensors(got), output_tensors(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().double(), y.detach().double()
        if not torch.isfinite(x).all() or not torch.isfinite(y).all():
            if not torch.equal(x.isfinite(), y.isfinite()):
                return float("inf")
            keep = y.isfinite()
            x, y = x[keep], y[keep]
        scale = float(y.abs().max()) if y.numel() else 0.0
        diff = float((x - y).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


@dataclasses.dataclass
class CompileDecision:
    """Whether the loop's forwards run compiled, and why (``describe()``'s ``compile``)."""

    on: bool
    reason: str

    def __str__(self) -> str:
        return ("on: " if self.on else "off: ") + self.reason


def eager_seconds(forward: Callable[[], Any], repeats: int = 2) -> float:
    """Seconds of one eager forward (the last of ``repeats``: the first warms up)."""
    took = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        took = time.perf_counter() - start
    return took


def compile_checked(module: nn.Module, x: Any, eager: Callable[[Any], Any], tolerance: float) -> tuple[Callable[[Any], Any] | None, str]:
    """``torch.compile(module)``, run once on ``x`` and compared with ``eager(x)``.

    Returns:
        ``(compiled, what)``: the compiled callable and its measured difference, or ``None``
        and why it cannot be used (the compile failed, or its output differs).
    """
    try:
        compiled = torch.compile(module, dynamic=False)
        start = time.perf_counter()
        got = compiled(x)
        took = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - any compiler failure: stay eager, say why
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return None, f"torch.compile failed ({type(err).__name__}: {first}); the eager forward runs"
    diff = relative_difference(got, eager(x))
    if not diff <= tolerance:
        return None, (f"the compiled forward differs from the eager one by {diff:.2g} (relative, > "
                      f"{tolerance:g}) on the first batch; the eager forward runs")
    return compiled, f"inductor, compiled in {took:.0f} s, {diff:.1e} from the eager forward on the first batch"
