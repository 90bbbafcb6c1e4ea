"""``python -m benchmarks.bn_modes``: what BatchNorm's modes cost per grid point, per strategy.

Two models with BatchNorm2d, random init, 10 classes, on ``--images`` random 32×32 images in
batches of 16: torchvision's ResNet-18 and a small CNN (Conv 3→16, BN, ReLU, max-pool,
Conv 16→32, BN, ReLU, global average pool, Linear 32→10). A 3×3 plane; ``eval`` and
``recompute_bn`` (``bn_batches`` 1 and 4), each with the per-point loop (``strategy="loop"``)
and batched over the tile (``strategy="vmap"``: per-point statistics under ``torch.func.vmap``).
Every configuration runs on the same points once per round, alternating, ``--repeats`` rounds
after one warm-up; prints the median seconds per point, the ratio to the loop with the same
mode, the tile size the engine reports, and the largest relative difference from the loop.
``recompute_bn`` costs about ``bn_batches`` extra forward passes per point over ``eval``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

MODES = {
    "eval": {"model_mode": "eval"},
    "recompute_bn, bn_batches=1": {"model_mode": "recompute_bn", "bn_batches": 1},
    "recompute_bn, bn_batches=4": {"model_mode": "recompute_bn", "bn_batches": 4},
}
STRATEGIES = ("loop", "vmap")


def small_cnn() -> nn.Module:
    """The small CNN of the benchmark (random init, seeded by the caller)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def run_model(name: str, model: nn.Module, images: int, repeats: int, device: str) -> list[dict]:
    """Time every mode × strategy on ``model``; one row per configuration."""
    import landscapes as L

    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(images, 3, 32, 32, generator=g), torch.randint(0, 10, (images,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    dirs = [L.random_direction(model, normalization="filter", ignore="biasbn", seed=s) for s in (0, 1)]
    axes = [L.axis(-0.5, 0.5, 3)] * 2
    configs = [(mode, s) for mode in MODES for s in STRATEGIES]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    last: dict[tuple[str, str], object] = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for mode, strategy in configs:
            metric = L.Loss(nn.CrossEntropyLoss(), loader)
            started = time.perf_counter()
            land = L.evaluate(model, [metric], dirs, axes, strategy=strategy, **MODES[mode])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_:
                times[mode, strategy].append((time.perf_counter() - started) / 9)
            last[mode, strategy] = land
    rows = []
    for mode, strategy in configs:
        land, loop = last[mode, strategy], last[mode, "loop"]
        rel = float(np.max(np.abs(land["loss"] - loop["loss"]) / np.abs(loop["loss"])))
        rows.append({"model": name, "mode": mode, "strategy": land.metadata["strategy"],
                     "tile_points": land.metadata["tile_points"], "seconds": statistics.median(times[mode, strategy]),
                     "all": times[mode, strategy], "rel_diff": rel})
    loops = {r["mode"]: r["seconds"] for r in rows if r["strategy"] == "loop"}
    for r in rows:
        r["vs_loop"] = loops[r["mode"]] / r["seconds"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bn_modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="images, in batches of 16")
    parser.add_argument("--models", default="resnet18,cnn", help="comma-separated: resnet18, cnn")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        if name == "resnet18":
            sys.path.insert(0, "tests")
            from ecosystem import require  # the torchvision import beside CPU torch

            model = require("torchvision").models.resnet18(num_classes=10)
        elif name == "cnn":
            model = small_cnn()
        else:
            parser.error(f"--models: unknown model {name!r}; choose from resnet18, cnn.")
        rows += run_model(name, model, args.images, args.repeats, args.device)
    print(f"{args.images} images 32x32 in batches of 16, 3x3 plane, {args.device}, {args.threads} threads, "
          f"{args.repeats} rounds (medians)")
    print("| model | mode | strategy | tile points | s/point | vs loop | max rel diff vs loop |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['strategy']} | {r['tile_points']} | {r['seconds']:.4f} | "
              f"{r['vs_loop']:.2f}× | {r['rel_diff']:.1e} |")
    worst = max(r["rel_diff"] for r in rows)
    if worst > 1e-5:
        raise SystemExit(f"vmap and the loop disagree: max rel diff {worst:.1e} > 1e-5")


if __name__ == "__main__":
    main()
