"""Mode connectivity: the loss along paths between two minima, and the barriers on them.

- :func:`linear_path`: metrics along ``θ(t) = (1 − t)·θa + t·θb`` for ``t`` in ``[0, 1]``.
- :func:`fit_bezier`: a quadratic Bézier curve ``θ(t) = (1 − t)²θa + 2t(1 − t)θbend + t²θb``
  whose one bend is trained (Garipov et al. 2018) by sampling ``t ~ U(0, 1)`` at every step
  and minimizing the loss at ``θ(t)`` through ``torch.func.functional_call``: any model, no
  curve layers.
- :func:`evaluate_curve`: metrics along a fitted curve.
- :func:`barrier`: the barrier heights of Frankle et al. (2020) and Entezari et al. (2022).

Both paths are evaluated by the :class:`Evaluator` as combinations of their control points
(origin zero, basis ``[θa, θb]`` or ``[θa, θbend, θb]``, coordinates the Bernstein weights),
not as ``θa + t·(θb − θa)``: the weights at ``t = 0`` and ``t = 1`` are exactly ``(1, 0…)`` and
``(…0, 1)``, so the end points are the two checkpoints bit for bit and the end values are
the models' own. The per-point loop is the default strategy, for the same reason.

BatchNorm: the evaluated model's buffers hold one set of running statistics; with
``model_mode="eval"`` every point of a path uses them (those of the first model), which is
wrong away from it. ``model_mode="recompute_bn"`` re-estimates them at each point, as
Garipov et al. and Entezari et al. do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from landscapes._checks import check_choice, check_positive_int
from landscapes.adapters import Forward, ForwardSpec, Output, OutputSpec
from landscapes.bn import batchnorm_modules
from landscapes.errors import (
    ConfigurationError,
    EvaluationError,
    LandscapesWarning,
    ShapeMismatchError,
)
from landscapes.evaluate import BN_BATCHES, BoundForward, Evaluator, ModelMode, Strategy
from landscapes.metrics import Accuracy, Metric, flatten_metrics, metric_names
from landscapes.params import ParameterSpace

__all__ = [
    "Barrier",
    "BezierCurve",
    "PathValues",
    "barrier",
    "evaluate_curve",
    "fit_bezier",
    "linear_path",
]

Optimizer = Literal["sgd", "adam"]
OPTIMIZERS = ("sgd", "adam")
TRAIN_MODES = ("train", "eval")


@dataclass(frozen=True)
class Barrier:
    """Barrier heights of one quantity along a path (lower is better: a loss, an error).

    Attributes:
        frankle: ``max_t f(t) − (f(0) + f(1))/2`` (Frankle et al. 2020, "instability").
        entezari: ``max_t [f(t) − ((1 − t)·f(0) + t·f(1))]`` (Entezari et al. 2022).
        t_frankle, t_entezari: where each maximum is (the first such ``t``).
        start, end: ``f(0)``, ``f(1)``.
    """

    frankle: float
    entezari: float
    t_frankle: float
    t_entezari: float
    start: float
    end: float


def barrier(values: Sequence[float] | np.ndarray, t: Sequence[float] | np.ndarray | None = None) -> Barrier:
    """Both barrier heights of ``values`` measured at ``t``.

    Args:
        values: ``(steps,)`` a quantity where lower is better (a loss; for accuracy pass the
            error ``1 − accuracy``).
        t: ``(steps,)`` strictly increasing, starting at exactly 0 and ending at exactly 1;
            default ``linspace(0, 1, steps)``.

    Returns:
        A :class:`Barrier`; both heights are ≥ 0 since the end points are on the path.

    Raises:
        ShapeMismatchError: ``values`` and ``t`` differ in shape or are not 1-D.
        ConfigurationError: fewer than two points, ``t`` not from 0 to 1 increasing, or
            non-finite values.

    >>> b = barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])
    >>> b.frankle, b.entezari
    (1.5, 1.5)
    """
    f = np.asarray(values, dtype=np.float64)
    if f.ndim != 1:
        raise ShapeMismatchError(f"barrier: values have shape {f.shape}; give a 1-D array along the path.")
    tt = np.linspace(0.0, 1.0, f.size) if t is None else np.asarray(t, dtype=np.float64)
    if tt.shape != f.shape:
        raise ShapeMismatchError(f"barrier: t has shape {tt.shape} but values have {f.shape}; give one t per value.")
    if f.size < 2:
        raise ConfigurationError("barrier: need at least the two end points (t = 0 and t = 1).")
    if tt[0] != 0.0 or tt[-1] != 1.0 or not np.all(np.diff(tt) > 0):
        raise ConfigurationError(
            f"barrier: t must increase strictly from exactly 0 to exactly 1 (got {tt[0]!r} … "
            f"{tt[-1]!r}); evaluate the path with t = linspace(0, 1, steps)."
        )
    if not np.isfinite(f).all():
        raise ConfigurationError(
            f"barrier: values contain NaN or inf at t = {tt[~np.isfinite(f)].tolist()[:5]}; "
            "the path diverged there (check the models and the metric)."
        )
    start, end = float(f[0]), float(f[-1])
    i = int(np.argmax(f))
    excess = f - ((1.0 - tt) * start + tt * end)
    j = int(np.argmax(excess))
    return Barrier(
        frankle=float(f[i] - 0.5 * (start + end)),
        entezari=float(excess[j]),
        t_frankle=float(tt[i]),
        t_entezari=float(tt[j]),
        start=start,
        end=end,
    )


@dataclass(frozen=True)
class PathValues:
    """Metric values along a path.

    Attributes:
        t: ``(steps,)`` path coordinates, from exactly 0 to exactly 1.
        values: metric name → ``(steps,)`` values.
        accuracy: names of the metrics where higher is better (their barriers use the error).
        metadata: how it was computed (JSON-able).
    """

    t: np.ndarray
    values: dict[str, np.ndarray]
    accuracy: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None

    def barriers(self) -> dict[str, Barrier]:
        """The barrier of every metric: a loss as it is, an accuracy as its error ``1 − acc``
        (keyed ``"error"`` for ``"accuracy"``, else ``"<name>_error"``)."""
        out = {}
        for name, v in self.values.items():
            if name in self.accuracy:
                key = "error" if name == "accuracy" else f"{name}_error"
                out[key] = barrier(1.0 - v, self.t)
            else:
                out[name] = barrier(v, self.t)
        return out

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset`` with one variable per metric along dim ``t``."""
        import xarray as xr

        from landscapes.landscape import _jsonable

        return xr.Dataset(
            {name: ("t", np.asarray(v)) for name, v in self.values.items()},
            coords={"t": self.t},
            attrs=_jsonable(self.metadata or {}),
        )


@dataclass(frozen=True)
class BezierCurve:
    """A quadratic Bézier curve ``θ(t) = (1 − t)²·start + 2t(1 − t)·bend + t²·end`` in parameter space.

    Attributes:
        start, end: the two checkpoints' parameters (name → tensor).
        bend: the control point, keyed like ``model.named_parameters()``; load it with
            ``model.load_state_dict(curve.bend, strict=False)`` (buffers stay the model's).
        losses: ``(steps,)`` the training loss at each step of :func:`fit_bezier` (empty for
            an untrained curve).

    With the bend at the midpoint the curve is the straight line, ``θ(t) = (1 − t)·start + t·end``.
    """

    start: dict[str, torch.Tensor]
    bend: dict[str, torch.Tensor]
    end: dict[str, torch.Tensor]
    losses: np.ndarray

    @classmethod
    def through(
        cls,
        model_a: nn.Module | Mapping[str, torch.Tensor],
        model_b: nn.Module | Mapping[str, torch.Tensor],
        bend: Mapping[str, torch.Tensor] | None = None,
    ) -> BezierCurve:
        """An untrained curve from ``model_a`` to ``model_b``; ``bend`` default the midpoint."""
        names, a = _named(model_a, None, "BezierCurve: model_a")
        _, b = _named(model_b, names, "BezierCurve: model_b")
        if bend is None:
            mid = {n: (a[n] + b[n].to(a[n])) / 2 for n in names}
        else:
            _, mid = _named(bend, names, "BezierCurve: bend")
        return cls(
            start={n: a[n].clone() for n in names},
            bend={n: mid[n].detach().to(a[n]).clone() for n in names},
            end={n: b[n].to(a[n].device).clone() for n in names},
            losses=np.zeros(0),
        )

    @staticmethod
    def weights(t: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Bernstein weights ``((1 − t)², 2t(1 − t), t²)``, shape ``(len(t), 3)``."""
        tt = np.atleast_1d(np.asarray(t, dtype=np.float64))
        return np.stack([(1.0 - tt) ** 2, 2.0 * tt * (1.0 - tt), tt**2], axis=-1)

    def point(self, t: float) -> dict[str, torch.Tensor]:
        """Parameters at ``t`` (new tensors); at ``t = 0`` and ``t = 1`` copies of the end points."""
        if not 0.0 <= float(t) <= 1.0:
            raise ConfigurationError(f"BezierCurve.point: t={t!r} is outside [0, 1].")
        if t == 0:
            return {n: v.clone() for n, v in self.start.items()}
        if t == 1:
            return {n: v.clone() for n, v in self.end.items()}
        w0, w1, w2 = (float(w) for w in self.weights(t)[0])
        return {n: w0 * self.start[n] + w1 * self.bend[n] + w2 * self.end[n] for n in self.start}


def linear_path(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, torch.Tensor],
    metric: Metric | Sequence[Metric],
    *,
    steps: int = 25,
    model_mode: ModelMode = "eval",
    bn_batches: int = BN_BATCHES,
    device: str | torch.device | None = None,
    strategy: Strategy = "loop",
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
) -> PathValues:
    """Metrics along the straight line ``θ(t) = (1 − t)·θa + t·θb``, ``t = linspace(0, 1, steps)``.

    Args:
        model_a: the first model; the path is evaluated in it (its buffers, its forward).
        model_b: the second model, or its parameters (name → tensor; other entries skipped).
        metric: what to measure (``Loss``, ``Accuracy``, a list...).
        steps: points on the path, ends included (≥ 2).
        model_mode: ``"eval"``, ``"train"``, ``"recompute_bn"`` or ``"as_is"`` (see
            :class:`Evaluator`); ``"recompute_bn"`` for models with BatchNorm.
        bn_batches, device, forward, output: as for :class:`Evaluator`.
        strategy: the evaluator's strategy; the default per-point loop gives end values that
            equal the models' own exactly.

    Returns:
        A :class:`PathValues`; ``.barriers()`` gives the loss and error barriers.

    Raises:
        ConfigurationError: ``steps`` < 2 or bad options.
        ShapeMismatchError: the models' parameters differ in names or shapes.

    >>> import landscapes as L
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> loss = L.Loss(torch.nn.MSELoss(), torch.ones(4, 2), torch.zeros(4, 1))
    >>> linear_path(a, b, loss, steps=3).t.tolist()
    [0.0, 0.5, 1.0]
    """
    t = _t_axis(steps, "linear_path")
    names, a = _named(model_a, None, "linear_path: model_a")
    _, b = _named(model_b, names, "linear_path: model_b")
    _warn_bn(model_a, model_mode, "linear_path")
    coords = np.stack([1.0 - t, t], axis=1)
    coords[0], coords[-1] = (1.0, 0.0), (0.0, 1.0)
    values, meta = _along(
        model_a, metric, [a, b], coords, model_mode=model_mode, bn_batches=bn_batches,
        device=device, strategy=strategy, forward=forward, output=output,
    )
    meta.update(path="linear", steps=int(steps))
    return PathValues(t=t, values=values, accuracy=_accuracy_names(metric), metadata=meta)


def fit_bezier(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, torch.Tensor],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: tuple[torch.Tensor, torch.Tensor] | Any,
    *,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
    batch_size: int = 128,
    optimizer: Optimizer = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    model_mode: Literal["train", "eval"] = "train",
    bend: Mapping[str, torch.Tensor] | None = None,
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
) -> BezierCurve:
    """Train the bend of a quadratic Bézier curve from ``model_a`` to ``model_b``.

    At each step ``t ~ U(0, 1)`` and a batch are drawn, the parameters ``θ(t)`` are formed
    from the fixed ends and the trainable bend, and ``loss_fn(model(x) at θ(t), y)`` is
    minimized with respect to the bend alone, through ``torch.func.functional_call`` on
    ``model_a`` (whose own tensors are never touched; its buffers are copied, so BatchNorm
    statistics updated during training go to the copies).

    Args:
        model_a: the start of the curve; its architecture runs the forward passes.
        model_b: the end (a model or its parameters).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, differentiable.
        data: ``(inputs, targets)`` tensors (shuffled minibatches of ``batch_size`` are drawn
            with the seed), or an iterable of ``(inputs, targets)`` batches (a DataLoader),
            cycled through.
        steps: optimizer steps.
        lr, momentum, weight_decay: optimizer settings (``momentum`` for SGD only).
        seed: seeds ``t``, the minibatches and any randomness of the forward (dropout); the
            caller's global random state is left as it was.
        batch_size: minibatch size for tensor ``data``.
        optimizer: ``"sgd"`` or ``"adam"``.
        model_mode: ``"train"`` (BatchNorm on batch statistics, dropout on, as Garipov et
            al.) or ``"eval"``.
        bend: the initial bend; default the midpoint ``(θa + θb)/2`` (the curve starts as the line).
        forward, output: how a batch's inputs reach the model and what of its output
            ``loss_fn`` reads (see :mod:`landscapes.adapters`); default ``model(x)``, the tensor.

    Returns:
        The fitted :class:`BezierCurve` (ends are copies of the two models' parameters).

    Raises:
        ConfigurationError: bad options or empty data.
        EvaluationError: the loss became non-finite (lower ``lr``).
    """
    where = "fit_bezier"
    steps = check_positive_int("steps", steps, where=where)
    batch_size = check_positive_int("batch_size", batch_size, where=where)
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS, where=where)
    model_mode = check_choice("model_mode", model_mode, TRAIN_MODES, where=where)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"{where}: seed={seed!r}: expected an integer.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigurationError(f"{where}: lr={lr!r}: expected a positive learning rate.")
    if not isinstance(model_a, nn.Module):
        raise ConfigurationError(f"{where}: model_a must be an nn.Module, got {type(model_a).__name__}.")
    curve = BezierCurve.through(model_a, model_b, bend)
    names = list(curve.start)
    device = next(model_a.parameters()).device
    trainable = {n: curve.bend[n].clone().requires_grad_(True) for n in names}
    params = list(trainable.values())
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    buffers = {n: b.detach().clone() for n, b in model_a.named_buffers()}
    fwd, read = Forward(forward), Output(output)
    plain = fwd.how == "auto" and read.plain
    runner = model_a if plain else BoundForward(model_a, fwd)  # the adapters as a module for functional_call
    prefix = "" if plain else "model."
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, generator, device, where)
    losses = np.empty(steps)
    modules = list(model_a.modules())
    modes = [m.training for m in modules]
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model_a.train(model_mode == "train")
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            torch.manual_seed(seed)
            for step in range(steps):
                t = float(torch.rand((), generator=generator, dtype=torch.float64))
                x, y = next(batches)
                w0, w1, w2 = (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
                theta = {n: w0 * curve.start[n] + w1 * trainable[n] + w2 * curve.end[n] for n in names}
                out = torch.func.functional_call(
                    runner, ({prefix + n: v for n, v in theta.items()}, {prefix + n: b for n, b in buffers.items()}), (x,)
                )
                loss = loss_fn(out if plain else read(out), y)
                if not torch.isfinite(loss):
                    raise EvaluationError(
                        f"{where}: the loss is {loss.item()} at step {step} (t={t:.3f}); lower lr "
                        f"(now {lr}) or check the data."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[step] = float(loss.detach())
    finally:
        for mod, mode in zip(modules, modes, strict=True):
            mod.training = mode
    return BezierCurve(
        start=curve.start,
        bend={n: p.detach().clone() for n, p in trainable.items()},
        end=curve.end,
        losses=losses,
    )


def evaluate_curve(
    curve: BezierCurve,
    model: nn.Module,
    metric: Metric | Sequence[Metric],
    *,
    steps: int = 25,
    model_mode: ModelMode = "eval",
    bn_batches: int = BN_BATCHES,
    device: str | torch.device | None = None,
    strategy: Strategy = "loop",
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
) -> PathValues:
    """Metrics along ``curve`` at ``t = linspace(0, 1, steps)``; the end points are exactly
    the curve's two checkpoints.

    Args:
        curve: a :class:`BezierCurve` (from :func:`fit_bezier`).
        model: the architecture, usually the first model (its buffers are used in ``"eval"``).
        metric, steps, model_mode, bn_batches, device, strategy, forward, output: as for
            :func:`linear_path`.

    Returns:
        A :class:`PathValues`.
    """
    t = _t_axis(steps, "evaluate_curve")
    names, _ = _named(model, None, "evaluate_curve: model")
    basis = []
    for what, part in (("start", curve.start), ("bend", curve.bend), ("end", curve.end)):
        basis.append(_named(part, names, f"evaluate_curve: curve.{what}")[1])
    _warn_bn(model, model_mode, "evaluate_curve")
    coords = BezierCurve.weights(t)
    coords[0], coords[-1] = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    values, meta = _along(
        model, metric, basis, coords, model_mode=model_mode, bn_batches=bn_batches,
        device=device, strategy=strategy, forward=forward, output=output,
    )
    meta.update(path="bezier", steps=int(steps), fit_steps=int(curve.losses.size))
    return PathValues(t=t, values=values, accuracy=_accuracy_names(metric), metadata=meta)


# ------------------------------------------------------------------------------- helpers
def _t_axis(steps: Any, where: str) -> np.ndarray:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ConfigurationError(
            f"{where}: steps={steps!r}: a path needs at least 2 points (its two ends); give an integer ≥ 2."
        )
    t = np.linspace(0.0, 1.0, int(steps))
    t[0], t[-1] = 0.0, 1.0
    return t


def _named(
    source: nn.Module | Mapping[str, torch.Tensor], names: list[str] | None, what: str
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(parameter names, detached tensors): all parameters of a model, or ``names`` of a
    mapping (extra entries such as buffers skipped)."""
    if isinstance(source, nn.Module):
        got = {n: p.detach() for n, p in source.named_parameters()}
    elif isinstance(source, Mapping):
        got = {n: t.detach() for n, t in source.items() if isinstance(t, torch.Tensor)}
    else:
        raise ConfigurationError(f"{what} is a {type(source).__name__}; give a model or a mapping name -> tensor.")
    if names is None:
        if isinstance(source, Mapping):
            names = [n for n, t in got.items() if t.is_floating_point()]
        else:
            names = list(got)
        return names, {n: got[n] for n in names}
    missing = [n for n in names if n not in got]
    if missing:
        raise ShapeMismatchError(
            f"{what} lacks parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}; give two "
            "models of the same architecture."
        )
    return names, {n: got[n] for n in names}


def _along(
    model: nn.Module, metric: Metric | Sequence[Metric], basis: list[dict[str, torch.Tensor]],
    coords: np.ndarray, **options: Any,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Metric values at ``Σⱼ coords[:, j]·basis[j]`` (origin zero), point by point."""
    space = ParameterSpace.from_module(model)
    for j, part in enumerate(basis):
        space.check(part, what=f"path control point {j}")
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    evaluator = Evaluator(model, metric, basis, origin=zeros, **options)
    out = {name: np.empty(len(coords)) for name in evaluator.metric_names}
    with evaluator.hold_memory():
        for start in range(0, len(coords), evaluator.tile_points):
            block = evaluator.evaluate_points(coords[start : start + evaluator.tile_points])
            for name in out:
                out[name][start : start + len(block[name])] = block[name]
    return out, evaluator.describe()


def _accuracy_names(metric: Metric | Sequence[Metric]) -> tuple[str, ...]:
    metrics = flatten_metrics(metric)
    names = metric_names(metrics)
    return tuple(n for n, m in zip(names, metrics, strict=True) if isinstance(m, Accuracy))


def _warn_bn(model: nn.Module, model_mode: str, where: str) -> None:
    if model_mode == "eval" and isinstance(model, nn.Module) and batchnorm_modules(model):
        warnings.warn(
            f"{where}: the model has BatchNorm and model_mode='eval', so every point of the path "
            "uses the first model's running statistics; pass model_mode='recompute_bn' to "
            "re-estimate them at each point.",
            LandscapesWarning,
            stacklevel=3,
        )


def _batches(
    data: Any, batch_size: int, generator: torch.Generator, device: torch.device, where: str
) -> Iterator[tuple[Any, Any]]:
    """Endless ``(inputs, targets)`` batches on ``device``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        n = x.shape[0] if x.dim() > 0 else 0
        if n == 0 or y.shape[0] != n:
            raise ConfigurationError(
                f"{where}: data=(inputs, targets) need the same positive number of samples, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        x, y = x.to(device), y.to(device)

        def tensors() -> Iterator[tuple[Any, Any]]:
            while True:
                order = torch.randperm(n, generator=generator).to(device)
                for s in range(0, n, batch_size):
                    idx = order[s : s + batch_size]
                    yield x[idx], y[idx]

        return tensors()

    def loader() -> Iterator[tuple[Any, Any]]:
        while True:
            seen = False
            for batch in data:
                seen = True
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ConfigurationError(
                        f"{where}: a batch of data is a {type(batch).__name__}; give (inputs, "
                        "targets) pairs (a DataLoader over (x, y) samples)."
                    )
                yield _to(batch[0], device), _to(batch[1], device)
            if not seen:
                raise ConfigurationError(f"{where}: data yielded no batches; give a non-empty dataset.")

    try:
        iter(data)
    except TypeError:
        raise ConfigurationError(
            f"{where}: data is a {type(data).__name__}; give (inputs, targets) tensors or an "
            "iterable of such batches."
        ) from None
    return loader()


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x

