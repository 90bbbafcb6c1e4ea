"""Sketch, not a contender: the per-point loop with the first-layer shortcut, for the engine.

On W-MLP-a (all 1797 samples), the engine's batched tiles do not fit in the caches, and its
per-point loop still runs the full first layer. This is the path `design.md` describes
("per-point loop with reused buffers plus the first-layer shortcut"), for a Sequential of
Linear and ReLU layers. It precomputes ``x·W0ᵀ + b0``, ``x·D1ᵀ`` and ``x·D2ᵀ`` once. Then,
for each point, it builds ``relu(P0 + a·P1 + b·P2)`` in a reused buffer and runs the later
layers with ``addmm`` into reused buffers. It builds the point's later-layer parameters from
θ0 without stepping, and keeps the loss as a tensor (no ``.item()`` per point).

``python -m benchmarks.sketch_shortcut_loop`` times it against loss-landscapes (5 rounds,
alternating) and checks it against the plain per-point loop.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.contenders import Directions, LossLandscapesContender, PerPointLoop, make_directions
from benchmarks.workloads import Sizes, build_workloads


def shortcut_loop(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    directions: Directions,
    axes: list[np.ndarray],
) -> np.ndarray:
    """Mean cross-entropy on the plane; ``model`` is a Sequential of Linear and ReLU only."""
    lin = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]
    first, rest = lin[0][0], lin[1:]
    p0 = dict(model.named_parameters())
    d1, d2 = directions
    with torch.no_grad():

        def first_out(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.addmm(p[f"{first}.bias"], x, p[f"{first}.weight"].T)

        base, move1, move2 = first_out(p0), first_out(d1), first_out(d2)

        def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat(
                [p[f"{n}.{k}"].reshape(-1) for n, _ in rest for k in ("weight", "bias")]
            )

        o, e1, e2 = flat(p0), flat(d1), flat(d2)
        theta = torch.empty_like(o)
        views, at = [], 0
        for _, m in rest:  # (weight, bias) views into theta, and an output buffer per layer
            w_n, b_n = m.weight.numel(), m.out_features
            views.append(
                (
                    theta[at : at + w_n].view_as(m.weight),
                    theta[at + w_n : at + w_n + b_n],
                    torch.empty(len(x), m.out_features),
                )
            )
            at += w_n + b_n
        h0 = torch.empty_like(base)
        out = torch.empty(len(axes[0]) * len(axes[1]))
        k = 0
        for a in axes[0].tolist():
            for b in axes[1].tolist():
                torch.add(o, e1, alpha=a, out=theta).add_(e2, alpha=b)
                torch.add(base, move1, alpha=a, out=h0).add_(move2, alpha=b).relu_()
                h = h0
                for i, (w, bias, buf) in enumerate(views):
                    h = torch.addmm(bias, h, w.T, out=buf)
                    if i < len(views) - 1:
                        h.relu_()
                out[k] = F.cross_entropy(h, y)
                k += 1
    return out.double().view(len(axes[0]), len(axes[1])).numpy()


def main() -> None:
    torch.set_num_threads(2)
    workloads, _ = build_workloads(["W-MLP-a", "W-MLP-b"], Sizes())
    for w in workloads:
        d = make_directions(w.model)
        ref = PerPointLoop().run(w, d).values
        got = shortcut_loop(w.model, w.inputs, w.targets, d, w.axes)  # type: ignore[arg-type]
        diff = float(np.max(np.abs(got - ref) / np.abs(ref)))
        times: dict[str, list[float]] = {"sketch": [], "loss-landscapes": []}
        ll = LossLandscapesContender()
        for _ in range(5):
            start = time.perf_counter()
            shortcut_loop(w.model, w.inputs, w.targets, d, w.axes)  # type: ignore[arg-type]
            times["sketch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ll.run(w, d)
            times["loss-landscapes"].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{w.name}: sketch {med['sketch']:.3f} s, loss-landscapes {med['loss-landscapes']:.3f} s,"
            f" {med['loss-landscapes'] / med['sketch']:.2f}× loss-landscapes, rel diff {diff:.1e}"
        )


if __name__ == "__main__":
    main()
