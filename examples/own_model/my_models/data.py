"""Synthetic 8×8 images: a blurred blob in one of four quadrants; the label is the quadrant."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 256, seed: int = 0, noise: float = 0.5) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centres = torch.tensor([[2.0, 2.0], [2.0, 5.0], [5.0, 2.0], [5.0, 5.0]])[labels]
    jitter = torch.randn(n, 2, generator=g) * 0.7
    cy, cx = (centres + jitter).unbind(dim=1)
    blob = torch.exp(-((ys - cy.view(-1, 1, 1)) ** 2 + (xs - cx.view(-1, 1, 1)) ** 2) / 3.0)
    images = blob + noise * torch.randn(n, 8, 8, generator=g)
    return TensorDataset(images.unsqueeze(1), labels)
