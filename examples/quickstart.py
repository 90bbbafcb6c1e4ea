"""Notebook-style quick start: the loss landscape of a small MLP on scikit-learn's digits.

Run: python examples/quickstart.py [--out examples/out]. Writes a contour plot (PNG) and
prints the loss at θ0 and the landscape's minimum.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import landscapes as L  # noqa: E402


def main(out: Path, steps: int = 25) -> Path:
    # 1. data and a briefly trained model
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    # 2. two filter-normalized Gaussian directions (Li et al. 2018), biases zeroed
    directions = [L.random_direction(model, normalization="filter", ignore="biasbn", seed=s) for s in (0, 1)]

    # 3. loss and accuracy on a plane around θ0, all points from one engine call
    axes = [L.axis(-1, 1, steps), L.axis(-1, 1, steps)]
    land = L.evaluate(model, [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)], directions, axes, progress=True)

    loss = land["loss"]
    i, j = np.unravel_index(np.nanargmin(loss), loss.shape)
    centre = steps // 2
    print(f"loss at θ0 = {loss[centre, centre]:.4f}, accuracy = {land['accuracy'][centre, centre]:.3f}")
    print(f"minimum {loss[i, j]:.4f} at (x={axes[0][i]:+.3f}, y={axes[1][j]:+.3f}); strategy: {land.metadata['strategy']}")

    # 4. a contour plot (values[i, j] is at x[i], y[j]: transpose for matplotlib)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cs = ax.contourf(axes[0], axes[1], np.log10(loss).T, levels=30, cmap="viridis")
    ax.contour(axes[0], axes[1], np.log10(loss).T, levels=15, colors="k", linewidths=0.4)
    ax.plot(0, 0, "r*", markersize=10, label="θ0")
    fig.colorbar(cs, label="log10 loss")
    ax.set(xlabel="direction 1 (filter-normalized)", ylabel="direction 2", title="Digits MLP: loss landscape")
    ax.legend(loc="upper right")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quickstart_contour.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("examples/out"))
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    main(args.out, args.steps)
