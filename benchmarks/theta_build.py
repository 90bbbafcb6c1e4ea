"""``python -m benchmarks.theta_build``: what building each point's θ costs the loop strategy.

Three ways to write θ = θ0 + Σ cᵢ·dᵢ into the model at each point, every one from scratch:

* ``in place`` (the engine's): per parameter, ``torch.add(θ0, d₁, alpha=c₁, out=param)`` then
  ``param.add_(dᵢ, alpha=cᵢ)``; nothing of size m·n, no temporary;
* ``addmv``: one ``addmv`` into a preallocated flat buffer, then one foreach copy into the
  parameters;
* ``foreach``: per parameter, copy θ0's slice, then add each direction's slice scaled by cᵢ
  (``torch._foreach_copy_`` / ``torch._foreach_add_``): one more pass over the parameters;
* ``matrix`` (the engine before): the chunk's ``(m, n)`` matrix ``origin + C·B`` in one
  ``addmm``, then each point's row copied into the parameters.

Workloads: torchvision's ResNet-18 (random init, 10 classes, 11 M parameters) on 64 random
3×32×32 images in one batch (skipped without torchvision), W-CNN and W-MLP-a of the suite
(strategy ``loop``). Every way runs on the same points, alternating (the order rotated from
round to round), ``--repeats`` rounds;
the table gives the median seconds per point. The machine may be shared with other jobs:
alternating and medians are what make the comparison fair, not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import landscapes as L
from landscapes.evaluate import Evaluator


class _ForeachEvaluator(Evaluator):
    def _setter(self, c: torch.Tensor) -> Callable[[int], None]:
        named = dict(self.root.named_parameters())
        params = [named[s.name] for s in self.space.specs]
        origin = [self.origin[s.offset : s.stop].view(s.shape) for s in self.space.specs]
        basis = [[row[s.offset : s.stop].view(s.shape) for s in self.space.specs] for row in self.basis]
        coords = c.tolist()

        def set_point(p: int) -> None:
            torch._foreach_copy_(params, origin)
            for a, rows in zip(coords[p], basis, strict=True):
                torch._foreach_add_(params, rows, alpha=a)

        return set_point


class _AddmvEvaluator(Evaluator):
    def _setter(self, c: torch.Tensor) -> Callable[[int], None]:
        named = dict(self.root.named_parameters())
        params = [named[s.name] for s in self.space.specs]
        theta = torch.empty_like(self.origin)
        views = [theta[s.offset : s.stop].view(s.shape) for s in self.space.specs]
        basis_t = self.basis.T

        def set_point(p: int) -> None:
            torch.addmv(self.origin, basis_t, c[p], out=theta)
            torch._foreach_copy_(params, views)

        return set_point


class _MatrixEvaluator(Evaluator):
    """The old way: the chunk's ``(m, n)`` matrix of points (one addmm), each point copied in."""

    def _setter(self, c: torch.Tensor) -> Callable[[int], None]:
        params = list(self.root.parameters())
        views = self.space.unflatten(self._points(c))
        stacked = [views[s.name] for s in self.space.specs]

        def set_point(p: int) -> None:
            torch._foreach_copy_(params, [v[p] for v in stacked])

        return set_point


WAYS: dict[str, type[Evaluator]] = {
    "in place": Evaluator, "addmv": _AddmvEvaluator, "foreach": _ForeachEvaluator, "matrix": _MatrixEvaluator,
}


def _workloads(steps: int) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, int]]:
    from benchmarks.workloads import Sizes, build_workloads

    out = []
    sys.path.insert(0, "tests")
    try:
        from ecosystem import _declare_torchvision_ops  # the torchvision import beside CPU torch

        _declare_torchvision_ops()
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        out.append(("ResNet-18, 64 images 32x32", model, x, y, max(3, steps // 2)))
    except ImportError as err:
        print(f"ResNet-18 skipped: {err}", file=sys.stderr)
    built, _ = build_workloads(["W-CNN", "W-MLP-a"], Sizes(mlp_steps=steps, cnn_steps=steps))
    out += [(f"{w.name} ({w.description})", w.model, w.inputs, w.targets, steps) for w in built]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.theta_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=7, help="grid points per axis (ResNet-18: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only the workloads whose name starts with this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {args.repeats} alternating rounds, median s/point (shared machine)")
    print(f"{'workload':<60} {'way':<8} {'s/point':>9} {'vs matrix':>9} {'max rel diff':>12}")
    for name, model, x, y, steps in _workloads(args.steps):
        if args.only and not name.startswith(args.only):
            continue
        metric = L.Loss(nn.CrossEntropyLoss(), x, y)
        dirs = [L.random_direction(model, normalization="filter", ignore="biasbn", seed=s) for s in (0, 1)]
        coords = L.Grid([L.axis(-1, 1, steps)] * 2).coordinates((slice(None), slice(None)))
        evaluators = {way: cls(model, metric, dirs, strategy="loop") for way, cls in WAYS.items()}
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        values: dict[str, np.ndarray] = {}
        ways = list(evaluators)
        for r in range(args.repeats):  # a different order each round: no way always runs first
            for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                ev = evaluators[way]
                started = time.perf_counter()
                values[way] = ev.evaluate_points(coords)["loss"]
                times[way].append((time.perf_counter() - started) / len(coords))
        base = statistics.median(times["matrix"])
        for way, t in times.items():
            diff = float(np.max(np.abs(values[way] - values["matrix"]) / np.abs(values["matrix"])))
            print(f"{name[:60]:<60} {way:<8} {statistics.median(t):>9.4f} {base / statistics.median(t):>8.2f}x {diff:>12.1e}")


if __name__ == "__main__":
    main()
