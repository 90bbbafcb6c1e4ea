"""Deterministic, offline workloads: a trained model, its data and a grid.

* ``W-MLP-a`` / ``W-MLP-b``: scikit-learn digits, MLP 64-128-128-10, all 1797 samples in one
  batch (a) or the first 128 (b).
* ``W-CNN``: the same data as 1×8×8 images, two 3×3 convolutions and a linear head.
* ``W-LM``: a GPT-2-style decoder (``transformers``' ``GPT2Config``: 4 layers, width 256, 4
  heads, vocabulary 8192, 128 positions, random init, seeded), next-token loss over 64 seeded
  random sequences of 128 tokens in dict batches of 16 (``input_ids``, ``attention_mask``,
  ``labels``). Skipped with a note when ``transformers`` is not installed.
* ``W-GPU``: ResNet-56 on 50,000 seeded synthetic CIFAR-sized images (TF32 and bf16 autocast),
  plus W-MLP on the GPU. Built only when CUDA is available.

The study groups (:data:`STUDY_GROUPS`) are measured by modules of their own, not contender by
contender: ``W-BIG`` (``benchmarks.memory``: peak memory on large models), ``growth``
(``benchmarks.growth``: time per point from a 41×41 to a 201×201 grid) and ``scaling``
(``benchmarks.scaling``: the dask backend with one and two workers against the local backend).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Precision",
    "Workload",
    "Sizes",
    "WORKLOAD_GROUPS",
    "STUDY_GROUPS",
    "build_workloads",
    "precision_context",
    "resnet56",
]

Precision = Literal["fp32", "tf32", "bf16"]

#: Sanity bound on the engine-vs-loop difference: a hard requirement only for fp32.
AGREEMENT_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 5e-2}


@dataclass
class Workload:
    """One benchmark case: everything every contender needs, identical for all of them."""

    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    steps: int  # points per axis; the grid is steps × steps over [-1, 1]²
    device: torch.device
    precision: Precision = "fp32"
    tile_sizes: tuple[int, ...] = ()  # engine tile sizes (max_batch_points) to sweep
    extra: dict[str, object] = field(default_factory=dict)
    #: Dict batches (``input_ids``, ``attention_mask``, ``labels``) of a language model: the
    #: metric is the next-token loss over them, and ``inputs``/``targets`` hold all the
    #: sequences' ``input_ids``/``labels`` (for FLOP counts and sizes). None: a classifier.
    batches: list[dict[str, Any]] | None = None
    #: Also time the loop with ``compile="on"`` and ``"off"`` (the CNN and the transformer).
    compile_candidates: bool = False

    @property
    def axes(self) -> list[np.ndarray]:
        """The two grid axes, float64 coordinates from -1 to 1."""
        return [np.linspace(-1.0, 1.0, self.steps)] * 2

    @property
    def points(self) -> int:
        """Number of grid points."""
        return self.steps * self.steps

    @property
    def tolerance(self) -> float:
        """Largest acceptable max relative difference between the engine and the loop."""
        return AGREEMENT_TOLERANCE[self.precision]


@contextlib.contextmanager
def precision_context(precision: Precision, device: torch.device) -> Iterator[None]:
    """Run the body in fp32 (no TF32), fp32 with TF32 matmuls, or bf16 autocast (CPU too).

    What the contenders other than the engine run under; the engine gets ``precision=``.
    Autocast's weight cache is off: the contenders change the parameters in place inside one
    region, and the cache would keep the first point's bf16 weights for the whole grid.
    """
    if device.type != "cuda":
        if precision == "tf32":
            raise ValueError("precision='tf32' is CUDA only; use fp32 or bf16 on a CPU")
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" else contextlib.nullcontext():
            yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- data and models


def digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits, standardized per feature: ``(1797, 64)`` float32, ``(1797,)`` int64."""
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    data = load_digits()
    x = StandardScaler().fit_transform(data.data).astype(np.float32)
    return torch.from_numpy(x).to(device), torch.from_numpy(data.target).long().to(device)


def mlp() -> nn.Sequential:
    """MLP 64-128-128-10 with ReLU."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def small_cnn() -> nn.Sequential:
    """Conv(1,16,3,p1)-ReLU-Conv(16,32,3,p1)-ReLU-Flatten-Linear(2048,10) for 1×8×8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5, seed: int = 0
) -> nn.Module:
    """A few epochs of Adam (lr 1e-3, batch 64, seeded shuffles); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            idx = idx.to(x.device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block with the parameter-free shortcut (option A of He et al.)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 3×32×32 inputs: 16/32/64 channels, n basic blocks per stage."""

    def __init__(self, n: int = 9, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet56(num_classes: int = 10, *, seed: int = 0) -> ResNetCifar:
    """ResNet-56 for CIFAR (0.85 M parameters), seeded.

    BatchNorm scales and shifts are drawn as ``1 + 0.1·N(0, 1)`` and ``0.1·N(0, 1)`` instead of
    ones and zeros, as after training: with exactly zero shifts, loss-landscapes 3.0.6's filter
    normalization divides 0 by 0 and raises ``ZeroDivisionError``.
    """
    torch.manual_seed(seed)
    model = ResNetCifar(9, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


def synthetic_cifar(
    count: int, device: torch.device, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` standard-normal 3×32×32 images and uniform labels from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (count,), generator=gen)
    return x.to(device), y.to(device)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch: int = 500) -> nn.Module:
    """Set BatchNorm running statistics to the cumulative average over ``x``; return eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for chunk in x.split(batch):
        model(chunk)
    return model.eval()


# --------------------------------------------------------------------------- workloads

_MLP_TILES = (16, 64, 256)
_CNN_TILES = (8, 64)
_GPU_TILES = ()  # ResNet-56 runs take minutes each: only the engine's own tile sizes

#: The workload groups ``--workloads`` accepts: contenders timed on one grid.
WORKLOAD_GROUPS = ("W-MLP-a", "W-MLP-b", "W-CNN", "W-LM", "W-GPU")
#: The study groups ``--workloads`` accepts (see the module docstring).
STUDY_GROUPS = ("W-BIG", "growth", "scaling")


@dataclass(frozen=True)
class Sizes:
    """Grid and data sizes: the issue's by default, small ones for ``--quick``."""

    mlp_steps: int = 41
    cnn_steps: int = 41
    gpu_steps: int = 51
    gpu_images: int = 50_000
    lm_steps: int = 21
    lm_sequences: int = 64
    memory_cases: tuple[str, ...] = ("mlp-4m", "gpt2-92m", "pipeline-mlp-17m")  # W-BIG
    memory_steps: int = 5
    growth_steps: tuple[int, ...] = (41, 101, 201)
    growth_rounds: int = 3
    scaling_steps: int = 101
    scaling_rounds: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(mlp_steps=11, cnn_steps=5, gpu_steps=5, gpu_images=5_000, lm_steps=5, lm_sequences=8,
                   memory_cases=("mlp-4m", "pipeline-mlp-17m"), memory_steps=3, growth_steps=(11, 21, 41),
                   growth_rounds=1, scaling_steps=31, scaling_rounds=1)


@functools.cache
def _mlp_workloads(device: torch.device, steps: int, suffix: str = "") -> tuple[Workload, ...]:
    x, y = digits(device)
    torch.manual_seed(0)
    model = train(mlp().to(device), x, y)
    desc = "digits, MLP 64-128-128-10"
    return (
        Workload(
            f"W-MLP-a{suffix}",
            f"{desc}, all 1797 samples",
            model,
            x,
            y,
            steps,
            device,
            tile_sizes=_MLP_TILES,
        ),
        Workload(
            f"W-MLP-b{suffix}",
            f"{desc}, first 128 samples",
            model,
            x[:128],
            y[:128],
            steps,
            device,
            tile_sizes=_MLP_TILES,
        ),
    )


def _cnn_workloads(device: torch.device, steps: int) -> list[Workload]:
    x, y = digits(device)
    x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = train(small_cnn().to(device), x, y)
    return [
        Workload(
            "W-CNN",
            "digits as 1×8×8, Conv16-Conv32-Linear, all 1797 samples",
            model,
            x,
            y,
            steps,
            device,
            tile_sizes=_CNN_TILES,
            compile_candidates=True,
        )
    ]


#: W-LM: GPT-2-style decoder and data (issue 15).
LM_CONFIG = {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 8192, "n_positions": 128}
LM_TOKENS, LM_BATCH = 128, 16


def _transformers() -> Any:
    """``transformers``, imported beside a CPU build of torch (see tests/ecosystem.py), or None."""
    if importlib.util.find_spec("transformers") is None:
        return None
    sys.path.insert(0, "tests")
    try:  # transformers imports torchvision when it is installed
        from ecosystem import _declare_torchvision_ops

        _declare_torchvision_ops()
    except ImportError:  # not run from the repository root: plain import
        pass
    finally:
        sys.path.remove("tests")
    import transformers

    return transformers


def gpt2_lm(*, seed: int = 0) -> nn.Module:
    """The W-LM decoder: ``GPT2LMHeadModel`` of :data:`LM_CONFIG`, random init from ``seed``, eval mode."""
    tr = _transformers()
    if tr is None:
        raise ImportError("transformers is not installed (pip install -e '.[models]')")
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(**LM_CONFIG, bos_token_id=0, eos_token_id=0)
    return tr.GPT2LMHeadModel(cfg).eval()


def lm_batches(sequences: int, device: torch.device, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``sequences`` seeded random token sequences of :data:`LM_TOKENS`, in dict batches of
    :data:`LM_BATCH` with ``labels`` = ``input_ids`` (the loss shifts them) and no padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LM_CONFIG["vocab_size"], (sequences, LM_TOKENS), generator=gen).to(device)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
        for chunk in ids.split(LM_BATCH)
    ]


def _lm_workloads(device: torch.device, sizes: Sizes) -> list[Workload]:
    model = gpt2_lm().to(device)
    batches = lm_batches(sizes.lm_sequences, device)
    ids = torch.cat([b["input_ids"] for b in batches])
    cfg = LM_CONFIG
    desc = (f"GPT-2-style decoder ({cfg['n_layer']} layers, width {cfg['n_embd']}, {cfg['n_head']} heads, "
            f"vocab {cfg['vocab_size']}), next-token loss, {sizes.lm_sequences} sequences × {LM_TOKENS} tokens "
            f"in dict batches of {LM_BATCH}")
    return [Workload("W-LM", desc, model, ids, ids.clone(), sizes.lm_steps, device, batches=batches, compile_candidates=True)]


def _gpu_workloads(sizes: Sizes) -> list[Workload]:
    device = torch.device("cuda")
    x, y = synthetic_cifar(sizes.gpu_images, device)
    model = calibrate_batchnorm(resnet56(seed=0).to(device), x[:5000])
    desc = f"ResNet-56, {sizes.gpu_images} synthetic 3×32×32 images, BatchNorm eval"
    out = [
        Workload(
            f"W-GPU-resnet56-{p}",
            f"{desc}, {p}",
            model,
            x,
            y,
            sizes.gpu_steps,
            device,
            p,
            tile_sizes=_GPU_TILES,
        )
        for p in ("tf32", "bf16")
    ]
    return out + list(_mlp_workloads(device, sizes.mlp_steps, suffix="-cuda"))


def build_workloads(names: list[str], sizes: Sizes) -> tuple[list[Workload], list[str]]:
    """Build the named workload groups; returns the workloads and notes on skipped groups."""
    workloads: list[Workload] = []
    notes: list[str] = []
    cpu = torch.device("cpu")
    for name in names:
        if name not in WORKLOAD_GROUPS:
            raise ValueError(
                f"--workloads: unknown workload {name!r}; choose from {', '.join(WORKLOAD_GROUPS)}."
            )
        if name in ("W-MLP-a", "W-MLP-b"):
            workloads += [w for w in _mlp_workloads(cpu, sizes.mlp_steps) if w.name == name]
        elif name == "W-CNN":
            workloads += _cnn_workloads(cpu, sizes.cnn_steps)
        elif name == "W-LM":
            if _transformers() is None:
                notes.append("W-LM skipped: transformers is not installed (pip install -e '.[models]')")
            else:
                workloads += _lm_workloads(cpu, sizes)
        elif torch.cuda.is_available():
            workloads += _gpu_workloads(sizes)
        else:
            notes.append("W-GPU skipped: no CUDA device")
    return workloads, notes
