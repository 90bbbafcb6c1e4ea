"""Sharpness: how much the loss rises within a radius ρ of θ0.

- :func:`average_sharpness`: the mean rise under random perturbations of norm ρ (on the
  sphere; element-wise scaled by ``|θ|`` with ``adaptive=True``), with a standard error. For
  a quadratic loss it is ``ρ² tr(H) / (2n)``.
- :func:`worst_case_sharpness`: the largest rise found by projected gradient ascent in the
  ℓ2 or ℓ∞ ball (SAM's inner problem, iterated); ``ρ² λmax / 2`` for a quadratic with ℓ2.
- :func:`grid_sharpness`: the same idea on a computed landscape: the mean loss of the grid
  points within a radius of θ0 (θ0 itself excluded), minus the loss at θ0.

"Adaptive" follows Kwon et al. (2021, ASAM): the ball is ``‖ε / |θ|‖ ≤ ρ``, so the measure
does not change when a ReLU network's layers are rescaled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from landscapes._checks import check_choice, check_positive_int
from landscapes.adapters import ForwardSpec, OutputSpec
from landscapes.curvature import (
    ModelMode,
    ParamsSpec,
    _generator,
    _loss_metric,
    _Objective,
    _select,
    _t975,
)
from landscapes.errors import ConfigurationError, LandscapesWarning
from landscapes.evaluate import Evaluator
from landscapes.params import ParameterSpace
from landscapes.wrappers import ModelWrapper, wrap_model

__all__ = ["SharpnessEstimate", "average_sharpness", "worst_case_sharpness", "grid_sharpness"]

Norm = Literal["l2", "linf"]
NORMS = ("l2", "linf")
#: Perturbations evaluated together by one :class:`Evaluator` (its basis is chunk × n).
CHUNK = 16


@dataclass(frozen=True)
class SharpnessEstimate:
    """A loss rise within radius ρ of θ0.

    Attributes:
        value: the mean rise (average case) or the largest rise found (worst case).
        stderr: the standard error of the mean (NaN for the worst case: a lower bound).
        interval: a two-sided 95 % interval of the mean (NaNs for the worst case).
        relative: ``value / loss`` (scale-free; NaN when the loss at θ0 is 0).
        loss: the loss at θ0.
        rho: the radius.
        kind: ``"average"`` or ``"worst_case"``.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: whether the ball was scaled element-wise by ``|θ0|``.
        samples: perturbations drawn (average) or gradient-ascent steps taken (worst case).
        evaluations: passes over the data (loss evaluations, with a gradient in the worst case).
        history: the rise of each perturbation (average) or at each ascent iterate (worst case).
        info: how it was computed (model mode, method).
    """

    value: float
    stderr: float
    interval: tuple[float, float]
    relative: float
    loss: float
    rho: float
    kind: str
    norm: str
    adaptive: bool
    samples: int
    evaluations: int
    history: tuple[float, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


def _check_rho(rho: Any, where: str) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ConfigurationError(f"{where}: rho={rho!r}: expected a positive radius such as 0.05.")
    return float(rho)


def _relative(value: float, loss: float) -> float:
    return value / abs(loss) if loss != 0 and math.isfinite(loss) else math.nan


def average_sharpness(
    model: nn.Module | ModelWrapper,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    rho: float,
    samples: int = 32,
    adaptive: bool = False,
    antithetic: bool = True,
    params: ParamsSpec = None,
    seed: int = 0,
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
    model_mode: ModelMode = "eval",
    target_key: str = "labels",
) -> SharpnessEstimate:
    """The mean loss rise under random perturbations of norm ρ.

    Each perturbation is ``ε = ρ g / ‖g‖`` for a standard Gaussian g (so ``E[εεᵀ] = ρ² I / n``),
    multiplied element-wise by ``|θ0|`` with ``adaptive``. With ``antithetic`` each draw is
    evaluated at ``θ0 ± ε`` and counts ``(L(θ0+ε) + L(θ0−ε))/2 − L(θ0)``: the same mean, without
    the gradient's first-order noise. The points are evaluated by :class:`landscapes.Evaluator`
    (batched where the model allows it), with the perturbations as its directions.

    Args:
        model: the model at θ0 (left unchanged), or a :class:`ModelWrapper`.
        loss_fn: ``loss_fn(outputs, target) -> scalar``.
        data: an ``(inputs, target)`` batch, a mapping batch, or an iterable of batches.
        rho: the radius.
        samples: perturbations to draw (at least 2).
        adaptive: scale each perturbation element-wise by ``|θ0|``.
        antithetic: evaluate ``θ0 − ε`` too.
        params: glob pattern(s): perturb only these parameters.
        seed: seed of the perturbations.
        forward, output, model_mode, target_key: as for :func:`landscapes.evaluate`.

    Returns:
        A :class:`SharpnessEstimate` with ``kind="average"``.

    >>> net = nn.Linear(2, 1, bias=False)
    >>> x, y = torch.eye(2), torch.zeros(2, 1)
    >>> _ = nn.init.zeros_(net.weight)
    >>> round(average_sharpness(net, nn.MSELoss(), (x, y), rho=0.1).value, 6)  # ρ²·tr(H)/(2n), H = I
    0.005
    """
    where = "average_sharpness"
    rho = _check_rho(rho, where)
    check_positive_int("samples", samples, where=where)
    if samples < 2:
        raise ConfigurationError(f"{where}: samples={samples}: a standard error needs at least 2; raise samples.")
    gen = _generator(seed, where)
    metric = _loss_metric(loss_fn, data, target_key, where)
    wrapper = wrap_model(model, forward)
    space = ParameterSpace.from_module(wrapper.root)
    chosen = set(_select(space.names, params, where))
    mask = torch.zeros(space.numel, dtype=torch.bool)
    for s in space.specs:
        if s.name in chosen:
            mask[s.offset : s.stop] = True
    theta0 = torch.cat([p.detach().reshape(-1).double().cpu() for p in wrapper.root.parameters()])
    scale = theta0.abs()[mask] if adaptive else torch.ones(int(mask.sum()), dtype=torch.float64)
    eps = torch.zeros(samples, space.numel, dtype=torch.float64)
    for i in range(samples):
        g = torch.randn(int(mask.sum()), generator=gen, dtype=torch.float64)
        eps[i, mask] = rho * g / g.norm() * scale
    strategy = "loop" if model_mode in ("train", "as_is") else "auto"
    rises: list[float] = []
    loss0 = math.nan
    evaluations = 0
    info: dict[str, Any] = {}
    for start in range(0, samples, CHUNK):
        block = eps[start : start + CHUNK]
        c = block.shape[0]
        rows = [torch.eye(c, dtype=torch.float64)] + ([-torch.eye(c, dtype=torch.float64)] if antithetic else [])
        if start == 0:
            rows.insert(0, torch.zeros(1, c, dtype=torch.float64))
        coords = torch.cat(rows).numpy()
        ev = Evaluator(wrapper, metric, block, strategy=strategy, model_mode=model_mode, output=output)
        values = ev.evaluate_points(coords)[metric.name]
        evaluations += len(coords)
        info = {"model_mode": model_mode, "strategy": ev.strategy}
        if start == 0:
            loss0, values = float(values[0]), values[1:]
        plus = values[:c]
        minus = values[c:] if antithetic else None
        mid = (plus + minus) / 2 if minus is not None else plus
        rises.extend((mid - loss0).tolist())
    r = np.asarray(rises)
    value = float(r.mean())
    se = float(r.std(ddof=1) / math.sqrt(r.size))
    half = _t975(r.size - 1) * se
    return SharpnessEstimate(
        value=value, stderr=se, interval=(value - half, value + half), relative=_relative(value, loss0),
        loss=loss0, rho=rho, kind="average", norm="l2", adaptive=bool(adaptive), samples=samples,
        evaluations=evaluations, history=tuple(rises), info=info,
    )


def worst_case_sharpness(
    model: nn.Module | ModelWrapper,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    rho: float,
    norm: Norm = "l2",
    steps: int = 20,
    lr: float | None = None,
    adaptive: bool = False,
    params: ParamsSpec = None,
    seed: int = 0,
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
    model_mode: ModelMode = "eval",
    target_key: str = "labels",
) -> SharpnessEstimate:
    """The largest loss rise found in the ball ``‖ε‖ ≤ ρ`` by projected gradient ascent.

    From a random point on the ball's surface (seeded), each step moves along the normalized
    gradient (ℓ2: ``u += lr·g/‖g‖``, then back into the ball; ℓ∞: ``u += lr·sign(g)``, then
    clipped), in coordinates ``u = ε / |θ0|`` with ``adaptive``. The result is the best rise
    seen, a lower bound of the true maximum; ``history`` shows its progress. For a quadratic
    at its minimum and ℓ2 this is power iteration, which converges to ``ρ² λmax / 2``.

    Args:
        model, loss_fn, data: see :func:`average_sharpness`.
        rho: the radius.
        norm: ``"l2"`` or ``"linf"``.
        steps: gradient steps (each one pass over the data with a gradient).
        lr: the step length in the ball's coordinates; default ρ (ℓ2) or ρ/2 (ℓ∞).
        adaptive: the ball ``‖ε / |θ0|‖ ≤ ρ``.
        params: glob pattern(s): perturb only these parameters.
        seed: seed of the starting point.
        forward, output, model_mode, target_key: see :func:`landscapes.hessian_eigenvalues`.

    Returns:
        A :class:`SharpnessEstimate` with ``kind="worst_case"``.

    >>> net = nn.Linear(2, 1, bias=False)
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
    >>> _ = nn.init.zeros_(net.weight)
    >>> round(worst_case_sharpness(net, nn.MSELoss(), (x, y), rho=0.1).value, 6)  # ρ²·λmax/2
    0.02
    """
    where = "worst_case_sharpness"
    rho = _check_rho(rho, where)
    norm = check_choice("norm", norm, NORMS, where=where)
    check_positive_int("steps", steps, where=where)
    if lr is None:
        lr = rho if norm == "l2" else rho / 2
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigurationError(f"{where}: lr={lr!r}: expected a positive step length, or None for the default.")
    gen = _generator(seed, where)
    obj = _Objective(model, _loss_metric(loss_fn, data, target_key, where), where=where, params=params,
                     forward=forward, output=output, model_mode=model_mode)
    n = obj.n
    with obj.session():
        theta0 = obj.theta0.double()
        scale = theta0.abs() if adaptive else torch.ones_like(theta0)
        g0 = torch.randn(n, generator=gen, dtype=torch.float64).to(theta0.device)
        u = rho * g0 / g0.norm() if norm == "l2" else rho * torch.sign(g0)
        loss0 = obj.value()
        history: list[float] = []
        best = -math.inf
        for _ in range(steps):
            loss, g = obj.value_and_grad((theta0 + scale * u).to(obj.dtype))
            history.append(loss - loss0)
            best = max(best, loss - loss0)
            gu = (g.to(theta0.device) * scale)
            if norm == "l2":
                gn = float(gu.norm())
                if gn == 0:
                    break  # a stationary point of the perturbed loss
                u = u + lr * gu / gn
                un = float(u.norm())
                if un > rho:
                    u = u * (rho / un)
            else:
                u = torch.clamp(u + lr * torch.sign(gu), -rho, rho)
        last = obj.value((theta0 + scale * u).to(obj.dtype)) - loss0
        history.append(last)
        best = max(best, last)
        info = obj.describe()
    return SharpnessEstimate(
        value=float(best), stderr=math.nan, interval=(math.nan, math.nan), relative=_relative(best, loss0),
        loss=float(loss0), rho=rho, kind="worst_case", norm=norm, adaptive=bool(adaptive),
        samples=len(history) - 1, evaluations=obj.passes, history=tuple(history), info=info,
    )


def grid_sharpness(
    values: np.ndarray,
    axes: Sequence[np.ndarray | Sequence[float]],
    *,
    radius: float,
    relative: bool = False,
) -> float:
    """Sharpness read off a computed landscape: the mean of the grid values within ``radius``
    of θ0 (Euclidean in the grid's coordinates, θ0 itself and non-finite values excluded),
    minus the value at θ0; with ``relative``, divided by ``|value at θ0|``.

    Args:
        values: a metric (the loss) on the grid, shape ``(len(axes[0]), ...)`` in ``ij`` order.
        axes: the grid's coordinates; each must contain 0 (θ0).
        radius: the neighbourhood's radius, in coordinate units.
        relative: divide the rise by the loss at θ0 (a scale-free figure).

    Returns:
        The rise, or NaN with a :class:`LandscapesWarning` when no other grid point lies within
        ``radius`` (or the relative form has a zero loss at θ0).

    Raises:
        ConfigurationError: θ0 is not a grid point, or the shapes disagree.

    >>> grid_sharpness(np.array([1.0, 0.0, 4.0]), [np.array([-1.0, 0.0, 1.0])], radius=1.0)
    2.5
    """
    where = "grid_sharpness"
    values = np.asarray(values, dtype=np.float64)
    axes = [np.asarray(a, dtype=np.float64) for a in axes]
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0):
        raise ConfigurationError(f"{where}: radius={radius!r}: expected a positive radius in coordinate units.")
    shape = tuple(a.size for a in axes)
    if values.shape != shape:
        raise ConfigurationError(
            f"{where}: values have shape {values.shape} but the axes give {shape}; pass the "
            "values of this grid, in ij order."
        )
    centre = []
    for i, a in enumerate(axes):
        hits = np.flatnonzero(a == 0.0)
        if hits.size == 0:
            raise ConfigurationError(
                f"{where}: axes[{i}] has no coordinate 0 (range {a.min():g}..{a.max():g}), so θ0 is "
                "not a grid point; use a grid whose axes contain 0."
            )
        centre.append(int(hits[0]))
    idx = tuple(centre)
    v0 = float(values[idx])
    mesh = np.meshgrid(*axes, indexing="ij")
    dist = np.sqrt(sum(m**2 for m in mesh))
    near = (dist <= radius) & np.isfinite(values)
    near[idx] = False
    if not near.any():
        warnings.warn(
            f"{where}: no grid point other than θ0 lies within radius={radius:g} (the nearest is "
            f"{np.min(np.where(dist > 0, dist, np.inf)):.3g} away); returning NaN. Raise radius or "
            "refine the grid.", LandscapesWarning, stacklevel=2,
        )
        return math.nan
    rise = float(np.mean(values[near]) - v0)
    if not relative:
        return rise
    if v0 == 0 or not math.isfinite(v0):
        warnings.warn(
            f"{where}: relative=True but the value at θ0 is {v0}; returning NaN.", LandscapesWarning, stacklevel=2,
        )
        return math.nan
    return rise / abs(v0)
