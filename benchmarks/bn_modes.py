"""``python -m benchmarks.bn_modes``: what BatchNorm's modes cost per grid point.

torchvision's ResNet-18 (random init, 10 classes) on 64 random 32×32 images in batches of 16,
a 3×3 plane, every mode on the same points, alternating, ``--repeats`` rounds; prints the
median seconds per point and the ratio to ``eval``. ``recompute_bn`` re-estimates the
statistics from ``bn_batches`` batches at every point (forward passes of the BatchNorm
layers' model in train mode), then evaluates in eval mode: its cost over ``eval`` is about
``bn_batches / batches`` extra forward passes per point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bn_modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, "tests")
    from ecosystem import require  # the torchvision import beside CPU torch

    import landscapes as L

    tv = require("torchvision")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    dirs = [L.random_direction(model, normalization="filter", ignore="biasbn", seed=s) for s in (0, 1)]
    axes = [L.axis(-0.5, 0.5, 3)] * 2
    modes = {"eval": {"model_mode": "eval"},
             "recompute_bn, bn_batches=1": {"model_mode": "recompute_bn", "bn_batches": 1},
             "recompute_bn, bn_batches=4": {"model_mode": "recompute_bn", "bn_batches": 4}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, kw in modes.items():
            metric = L.Loss(torch.nn.CrossEntropyLoss(), loader)
            started = time.perf_counter()
            L.evaluate(model, [metric], dirs, axes, strategy="loop", **kw)
            times[name].append((time.perf_counter() - started) / 9)
    base = statistics.median(times["eval"])
    print(f"ResNet-18, 64 images 32x32 in 4 batches, 3x3 plane, {args.threads} threads, {args.repeats} rounds")
    print(f"{'mode':<28} {'s/point (median)':>18} {'vs eval':>8}")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:<28} {m:>18.4f} {m / base:>7.2f}x")
    np.testing.assert_array_less(0, base)


if __name__ == "__main__":
    main()
