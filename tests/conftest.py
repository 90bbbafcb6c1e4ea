"""Real fixtures: seeded tiny models, data, and a guard that models come back unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)]
    model = nn.Sequential(*layers)
    if batchnorm:
        _randomize_bn(model)
    return model.eval()


class SmallCNN(nn.Module):
    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 4, 4)
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def make_cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(batchnorm)
    _randomize_bn(model)
    return model.eval()


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(50, 6, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    return x, y


@pytest.fixture
def image_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(321)
    return torch.randn(40, 16, generator=g), torch.randint(0, 3, (40,), generator=g)


def snapshot(model: nn.Module) -> dict:
    """Everything that must survive a landscape call unchanged."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["params"].keys() == before["params"].keys()
    for n, (t, rg) in before["params"].items():
        assert after["params"][n][1] == rg, f"requires_grad of {n} changed"
        assert torch.equal(after["params"][n][0], t), f"parameter {n} changed"
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), f"buffer {n} changed"
