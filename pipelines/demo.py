"""The bundled demo task: scikit-learn's digits (1797 8×8 images, 10 classes), no downloads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["load_digits_tensors", "digits_dataset", "DemoMLP", "DemoCNN"]

N_FEATURES = 64
N_CLASSES = 10


def load_digits_tensors(standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the digits as tensors.

    Args:
        standardize: Scale each feature to zero mean and unit standard deviation over the
            1797 samples (all of them are the training set). Features that are constant
            (border pixels) become 0.

    Returns:
        ``X`` of shape ``(1797, 64)``, float32, and ``y`` of shape ``(1797,)``, int64.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64)
    if standardize:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        x = np.divide(x - mean, std, out=np.zeros_like(x), where=std > 0)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(data.target.astype(np.int64))


def digits_dataset(standardize: bool = True) -> TensorDataset:
    """The digits as a ``TensorDataset`` of ``(x (64,), y)`` pairs; see `load_digits_tensors`."""
    return TensorDataset(*load_digits_tensors(standardize=standardize))


class DemoMLP(nn.Module):
    """Fully connected ReLU network, ``in_features → *hidden → num_classes``.

    The layers live in the plain ``nn.Sequential`` ``self.net`` (``Linear``, ``ReLU``, ...,
    ``Linear``), so a batched engine can recognise the structure.

    Args:
        in_features: Input width.
        hidden: Width of each hidden layer.
        num_classes: Output width (logits).
    """

    def __init__(
        self,
        in_features: int = N_FEATURES,
        hidden: Sequence[int] = (128, 128),
        num_classes: int = N_CLASSES,
    ) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden)]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], int(num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DemoCNN(nn.Module):
    """Small convolutional network on the 8×8 digits.

    ``(N, 64)`` or ``(N, 1, 8, 8)`` input → Unflatten to ``1×8×8`` → Conv(1, c1, 3, pad 1) →
    ReLU → Conv(c1, c2, 3, pad 1) → ReLU → Flatten → Linear(c2·64, num_classes). The layers
    live in the plain ``nn.Sequential`` ``self.net``.

    Args:
        channels: Output channels of the two convolutions.
        num_classes: Output width (logits).
    """

    def __init__(self, channels: Sequence[int] = (16, 32), num_classes: int = N_CLASSES) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 64, int(num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
