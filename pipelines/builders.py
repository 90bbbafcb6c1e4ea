"""Build library objects (model, data, metrics, grid axes) from the typed config sections."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import landscapes as L
from landscapes.checkpoints import load_into, load_state_dict
from landscapes.errors import ConfigurationError
from pipelines.config import DataConfig, GridConfig, MetricsConfig, PipelineConfig


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``model._target_`` with its keyword arguments."""
    if "_target_" not in model_cfg:
        raise ConfigurationError(
            "model._target_ is missing: name the model class, e.g. model._target_=pipelines.demo.DemoMLP."
        )
    try:
        model = instantiate(dict(model_cfg))
    except Exception as err:
        raise ConfigurationError(
            f"model: cannot instantiate {model_cfg['_target_']!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); check model._target_ and its keyword arguments."
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"model._target_={model_cfg['_target_']!r} built a {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def load_model(model_cfg: Mapping[str, Any], checkpoint: Path, *, trust_pickle: bool, strict: bool = True) -> nn.Module:
    """The configured model with the checkpoint's weights (strict key matching)."""
    model = build_model(model_cfg)
    load_into(model, load_state_dict(checkpoint, trust_pickle=trust_pickle), strict=strict)
    return model.eval()


def check_data_config(data_cfg: DataConfig) -> None:
    """Refuse bad ``data.limit`` / ``data.batch_size`` before anything is computed."""
    for key in ("limit", "batch_size"):
        value = getattr(data_cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"data.{key}={value!r}: give a positive integer or null.")


def build_dataset(data_cfg: DataConfig) -> Dataset:
    check_data_config(data_cfg)
    dataset_cfg = data_cfg.dataset or {}
    if "_target_" not in dataset_cfg:
        raise ConfigurationError(
            "data.dataset._target_ is missing: name a function or class returning a torch Dataset."
        )
    dataset = instantiate(dict(dataset_cfg))
    limit = data_cfg.limit
    if limit is not None:
        dataset = Subset(dataset, range(min(int(limit), len(dataset))))
    if len(dataset) == 0:
        raise ConfigurationError("data: the dataset is empty; check data.dataset and data.limit.")
    return dataset


def build_data(data_cfg: DataConfig) -> tuple[Any, Any]:
    """``(inputs, target)`` of one batch when ``batch_size`` is null, else ``(DataLoader, None)``."""
    dataset = build_dataset(data_cfg)
    batch_size = data_cfg.batch_size
    if batch_size is None:
        if isinstance(dataset, TensorDataset):
            x, y = dataset.tensors[:2]
            return x, y
        x, y = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
        return x, y
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False), None


def build_metrics(metrics_cfg: MetricsConfig, data: tuple[Any, Any]) -> list[L.Metric]:
    """``Loss`` (named "loss") and, if enabled, ``Accuracy`` on the same data: one forward pass."""
    inputs, target = data
    loss_cfg = metrics_cfg.loss
    if not loss_cfg or "_target_" not in loss_cfg:
        raise ConfigurationError("metrics.loss._target_ is missing, e.g. torch.nn.CrossEntropyLoss.")
    metrics: list[L.Metric] = [L.Loss(instantiate(dict(loss_cfg)), inputs, target, name="loss")]
    if metrics_cfg.accuracy:
        metrics.append(L.Accuracy(inputs, target, name="accuracy"))
    return metrics


def metric_names(metrics_cfg: MetricsConfig) -> list[str]:
    return ["loss", "accuracy"] if metrics_cfg.accuracy else ["loss"]


def grid_axes(grid_cfg: GridConfig) -> list[np.ndarray]:
    """One coordinate array per axis from ``grid.dims``, ``grid.steps`` and ``grid.range``."""
    dims = grid_cfg.dims
    if dims not in (1, 2):
        raise ConfigurationError(f"grid.dims={dims}: the pipeline computes lines (1) or planes (2).")
    steps = grid_cfg.steps
    steps = list(steps) if isinstance(steps, (list, tuple)) else [steps] * dims
    rng = grid_cfg.range
    if isinstance(rng, (list, tuple)) and rng and isinstance(rng[0], (list, tuple)):
        ranges = [list(r) for r in rng]
    else:
        ranges = [list(rng)] * dims
    if len(steps) != dims or len(ranges) != dims:
        raise ConfigurationError(
            f"grid: dims={dims} but steps={grid_cfg.steps} and range={grid_cfg.range}; "
            "give one value (or pair) for all axes, or one per axis."
        )
    axes = []
    for i, (n, r) in enumerate(zip(steps, ranges, strict=True)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigurationError(f"grid.steps={n!r} (axis {i}): expected an integer; set grid.steps to a positive integer.")
        if n < 1:
            raise ConfigurationError(
                f"grid.steps={n!r} (axis {i}): an axis needs at least one point; set grid.steps to a positive integer."
            )
        if len(r) != 2:
            raise ConfigurationError(f"grid.range={r} (axis {i}): give [low, high].")
        try:
            lo, hi = float(r[0]), float(r[1])
        except (TypeError, ValueError) as err:
            raise ConfigurationError(f"grid.range={r} (axis {i}): give two numbers [low, high].") from err
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ConfigurationError(f"grid.range={r} (axis {i}) is not finite; set finite numbers [low, high].")
        if lo == hi and n > 1:
            raise ConfigurationError(
                f"grid.range={r} (axis {i}) has zero length but grid.steps={n}; give low != high, or grid.steps=1."
            )
        axes.append(L.axis(lo, hi, n))
    return axes


def as_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "compute.device=cuda but no CUDA device is available; use compute.device=auto or cpu."
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def check_config(cfg: PipelineConfig) -> None:
    """Refuse config mistakes before any stage runs (the grid, data, device, directions)."""
    axes = grid_axes(cfg.grid)
    check_data_config(cfg.data)
    as_device(cfg.compute.device)
    towards = cfg.directions.towards or []
    if cfg.directions.kind == "checkpoints" and len(towards) != len(axes):
        n = len(axes)
        raise ConfigurationError(
            f"directions.towards has {len(towards)} checkpoint(s) but grid.dims={n}; give {n} "
            f"checkpoint(s) to move towards (directions.towards=[a.pt{', b.pt' if n == 2 else ''}])."
        )
