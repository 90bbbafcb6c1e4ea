"""Train SmallConvNet on blobs for a few epochs and save its state dict.

    PYTHONPATH=examples/own_model python -m my_models.train --out outputs/my_net.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from my_models.data import blobs
from my_models.net import SmallConvNet


def train(out: Path, epochs: int = 5, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = SmallConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(blobs(512, seed=1), batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/my_net.pt"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print(f"saved {train(args.out, args.epochs)}")


if __name__ == "__main__":
    main()
