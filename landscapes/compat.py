"""The calls of ``loss-landscapes`` 3.0.6, with the same names and signatures, done right.

Differences from that library (see ``docs/migration.md``): Gaussian, not uniform, directions;
``distance`` is the largest coordinate (in units of the normalized direction), with θ0 at the
centre for odd ``steps``; every point is computed from θ0 directly; the model is left exactly
as it was; BatchNorm runs in eval mode. ``seed=`` makes directions reproducible, and
``normalize=`` is accepted as an alias of ``normalization``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landscapes.directions import random_direction
from landscapes.errors import ConfigurationError
from landscapes.evaluate import Evaluator, evaluate
from landscapes.grid import axis
from landscapes.metrics import Metric, MetricPipeline
from landscapes.wrappers import ModelWrapper, wrap_model

__all__ = ["point", "linear_interpolation", "random_line", "planar_interpolation", "random_plane"]

Model = nn.Module | ModelWrapper
_UNSET: Any = object()


def point(model: Model, metric: Metric) -> Any:
    """The metric at the model's own parameters (eval mode, restored afterwards)."""
    wrapper = wrap_model(model)
    modules = list(wrapper.root.modules())
    modes = [m.training for m in modules]
    try:
        wrapper.eval()
        with torch.no_grad():
            return metric(wrapper)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def linear_interpolation(
    model_start: Model, model_end: Model, metric: Metric, steps: int = 100, deepcopy_model: bool = False
) -> np.ndarray:
    """The metric at θ(α) = (1 − α)·θ_start + α·θ_end for α = linspace(0, 1, steps).

    The first and last values are exactly the start and end models' values.

    Returns:
        Array ``(steps,)`` (``(steps, n_metrics)`` for a :class:`MetricPipeline`).
    """
    start, end = _models(deepcopy_model, model_start, model_end)
    alpha = np.linspace(0.0, 1.0, _steps(steps))
    coords = np.stack([1.0 - alpha, alpha], axis=1)
    # the loop evaluates each point exactly as the model's own forward would
    return _along(start, metric, [_params(start), _params(end)], coords, strategy="loop")


def random_line(
    model_start: Model,
    metric: Metric,
    distance: float = 0.1,
    steps: int = 100,
    normalization: str | None = "filter",
    deepcopy_model: bool = False,
    *,
    seed: int = 0,
    ignore: str | None = "biasbn",
    normalize: Any = _UNSET,
) -> np.ndarray:
    """The metric at θ0 + t·d for t = linspace(−distance, distance, steps).

    ``d = random_direction(model, normalization, ignore, seed)``; θ0 is at the centre when
    ``steps`` is odd.
    """
    (model,) = _models(deepcopy_model, model_start)
    normalization = _alias(normalization, normalize)
    d = random_direction(_root(model), normalization=normalization, ignore=ignore, seed=seed)
    t = axis(-float(distance), float(distance), _steps(steps))
    return _grid(model, metric, [d], [t])


def planar_interpolation(
    model_start: Model,
    model_end_one: Model,
    model_end_two: Model,
    metric: Metric,
    steps: int = 20,
    deepcopy_model: bool = False,
) -> np.ndarray:
    """values[i, j] at θ0 + aᵢ(θ1 − θ0) + bⱼ(θ2 − θ0), a, b = linspace(0, 1, steps).

    Computed as (1 − a − b)·θ0 + a·θ1 + b·θ2, so the three corners are the models exactly.
    """
    m0, m1, m2 = _models(deepcopy_model, model_start, model_end_one, model_end_two)
    a = np.linspace(0.0, 1.0, _steps(steps))
    aa, bb = np.meshgrid(a, a, indexing="ij")
    coords = np.stack([1.0 - aa - bb, aa, bb], axis=-1).reshape(-1, 3)
    flat = _along(m0, metric, [_params(m0), _params(m1), _params(m2)], coords, strategy="auto")
    return flat.reshape(len(a), len(a), *flat.shape[1:])


def random_plane(
    model: Model,
    metric: Metric,
    distance: float = 1,
    steps: int = 20,
    normalization: str | None = "filter",
    deepcopy_model: bool = False,
    *,
    seed: int = 0,
    ignore: str | None = "biasbn",
    normalize: Any = _UNSET,
) -> np.ndarray:
    """values[i, j] at θ0 + xᵢ·d1 + yⱼ·d2, x, y = linspace(−distance, distance, steps).

    ``d1``, ``d2`` = ``random_direction(seed=seed)``, ``random_direction(seed=seed + 1)``.
    """
    (model,) = _models(deepcopy_model, model)
    normalization = _alias(normalization, normalize)
    root = _root(model)
    dirs = [random_direction(root, normalization=normalization, ignore=ignore, seed=seed + i) for i in range(2)]
    t = axis(-float(distance), float(distance), _steps(steps))
    return _grid(model, metric, dirs, [t, t])


def _grid(model: Model, metric: Metric, directions: list, axes: list) -> np.ndarray:
    land = evaluate(model, metric, directions, axes)
    return _stack(metric, [land.values[n] for n in land.values])


def _along(model: Model, metric: Metric, basis: list, coords: np.ndarray, *, strategy: str) -> np.ndarray:
    zeros = {n: torch.zeros_like(p) for n, p in _root(model).named_parameters()}
    ev = Evaluator(model, metric, basis, origin=zeros, strategy=strategy)
    values = [np.empty(len(coords)) for _ in ev.metric_names]
    with ev.hold_memory():
        for start in range(0, len(coords), ev.tile_points):
            out = ev.evaluate_points(coords[start : start + ev.tile_points])
            for v, name in zip(values, ev.metric_names, strict=True):
                v[start : start + len(out[name])] = out[name]
    return _stack(metric, values)


def _stack(metric: Metric, values: Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(metric, MetricPipeline) or (isinstance(metric, Sequence) and not isinstance(metric, Metric)):
        return np.stack(values, axis=-1)
    return values[0]


def _params(model: Model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in _root(model).named_parameters()}


def _root(model: Model) -> nn.Module:
    return wrap_model(model).root


def _models(deep: bool, *models: Model) -> list[Model]:
    return [copy.deepcopy(m) if deep else m for m in models]


def _steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigurationError(f"steps={steps!r}: expected a positive integer number of points.")
    return int(steps)


def _alias(normalization: Any, normalize: Any) -> Any:
    if normalize is _UNSET:
        return normalization
    if normalization not in ("filter", normalize):
        raise ConfigurationError(
            f"normalization={normalization!r} and normalize={normalize!r} disagree; pass only one "
            "(normalize= is an alias kept for the loss-landscapes README)."
        )
    return normalize
