"""What is measured at a grid point.

Dataset metrics reduce over all their data exactly: ``_update`` returns per-point sums of
one batch, ``_compute`` divides once after every batch (and tile, and worker) has been added.
Several dataset metrics on the same data share one forward pass. Any other
:class:`Metric` follows the ``loss-landscapes`` protocol ``metric(model_wrapper) -> value``.
"""

from __future__ import annotations

import abc
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from landscapes.adapters import Output, OutputSpec, first_tensor, map_tensors, without_key
from landscapes.errors import ConfigurationError, ShapeMismatchError
from landscapes.wrappers import ModelWrapper, wrap_model

__all__ = [
    "Metric", "MetricPipeline", "DatasetMetric", "Loss", "Accuracy", "Perplexity", "ModelLoss",
    "DataSource", "flatten_metrics",
]

Batch = tuple[Any, torch.Tensor]


class DataSource:
    """Where a metric's batches come from.

    - ``inputs`` and ``target``: one batch.
    - ``inputs`` a mapping and no ``target``: one batch carrying its target under
      ``target_key`` (``"labels"``, as HuggingFace batches do); the whole mapping goes to
      the model.
    - ``inputs`` an iterable (e.g. a DataLoader) and no ``target``: batches that are
      ``(inputs, target)`` pairs or mappings carrying their target under ``target_key``.

    Inputs and targets may be tensors, tuples, lists or mappings of them, nested.
    """

    def __init__(self, inputs: Any, target: Any = None, *, target_key: str = "labels", needs_target: bool = True):
        self.target_key = target_key
        self.needs_target = needs_target
        if target is not None:
            self.batches: Iterable[Any] = [(inputs, target)]
            self.single = True
        elif isinstance(inputs, Mapping):
            if needs_target and target_key not in inputs:
                raise ConfigurationError(
                    f"a metric needs targets: the batch has keys {sorted(map(str, inputs))} but no "
                    f"{target_key!r}; add the targets under {target_key!r}, name their key with "
                    "target_key=, or pass them as target."
                )
            self.batches = [inputs]
            self.single = True
        elif isinstance(inputs, torch.Tensor) or inputs is None:
            raise ConfigurationError(
                "a metric needs targets: pass Loss(loss_fn, inputs, target), or an iterable of "
                "(inputs, target) batches such as a DataLoader as `inputs` with target=None."
            )
        else:
            self.batches = inputs
            self.single = False
        self.key = (id(inputs), id(target))

    def __iter__(self) -> Iterator[Batch]:
        key = self.target_key
        for n, batch in enumerate(self.batches):
            if isinstance(batch, Mapping):
                target = batch.get(key)
                if target is None and self.needs_target:
                    raise ConfigurationError(
                        f"batch {n} of the data is a mapping with keys {sorted(map(str, batch))} "
                        f"and no {key!r}; put the targets under {key!r} or name their key with "
                        "target_key=."
                    )
                yield batch, target
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                yield batch[0], batch[1]
            else:
                raise ConfigurationError(
                    f"batch {n} of the data is a {type(batch).__name__}, expected an (inputs, "
                    "target) pair or a mapping with the targets under "
                    f"{key!r}; give a DataLoader over a dataset of (x, y) samples."
                )


class Metric(abc.ABC):
    """A quantity computed from a model at one point (the ``loss-landscapes`` protocol).

    ``__call__`` returns one number: a Python or numpy number, or a tensor of one element.
    """

    name: str | None = None

    @abc.abstractmethod
    def __call__(self, model_wrapper: ModelWrapper) -> Any:
        """The value at the point where ``model_wrapper``'s parameters are."""


class MetricPipeline(Metric):
    """Several metrics at once; called on a wrapper it returns a tuple of their values."""

    def __init__(self, metrics: Sequence[Metric]):
        self.metrics = list(metrics)
        if not self.metrics:
            raise ConfigurationError("MetricPipeline needs at least one metric.")

    def __call__(self, model_wrapper: ModelWrapper) -> tuple:
        return tuple(m(model_wrapper) for m in self.metrics)


class DatasetMetric(Metric):
    """A metric that reduces over a dataset; the engine evaluates it for many points at once.

    Subclasses implement :meth:`_update`; the value is ``_compute(sum of _update, sum of
    _weight)``, by default the quotient.

    Args:
        inputs: one batch of inputs, or an iterable of batches (see :class:`DataSource`).
        target: the targets of a one-batch ``inputs``.
        name: the metric's name in the results.
        output: which part of the model's output this metric reads (see
            :class:`landscapes.adapters.Output`); None: the evaluator's ``output``.
        target_key: the key of the targets in mapping batches.
    """

    default_name = "metric"
    #: whether batches must carry targets
    needs_target = True
    #: the output adapter this metric reads when ``output`` is not given
    default_output: OutputSpec | None = None

    def __init__(
        self, inputs: Any, target: Any = None, *, name: str | None = None,
        output: OutputSpec | None = None, target_key: str = "labels",
    ):
        self.data = DataSource(inputs, target, target_key=target_key, needs_target=self.needs_target)
        self.name = name or self.default_name
        spec = output if output is not None else self.default_output
        self.output = Output(spec) if spec is not None else None

    @abc.abstractmethod
    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        """Per-point float64 sums for one batch: ``outputs`` ``(m, N, ...)`` → ``(m,)``."""

    def _weight(self, target: Any) -> float:
        """What one batch adds to the denominator (its number of samples)."""
        t = first_tensor(target)
        if t is None:
            return 1.0
        return float(t.shape[0]) if t.dim() > 0 else 1.0

    def _compute(self, total: torch.Tensor, weight: float) -> torch.Tensor:
        return total / weight

    def __call__(self, model_wrapper: ModelWrapper | nn.Module) -> float:
        model_wrapper = wrap_model(model_wrapper)
        device = _device_of(model_wrapper)
        read = self.output or Output()
        adapter = getattr(model_wrapper, "forward_adapter", None)
        key = self.data.target_key
        strip = adapter is not None and not adapter.takes(model_wrapper.root, key)
        total, weight = torch.zeros(1, dtype=torch.float64), 0.0
        with torch.no_grad():
            for x, y in self.data:
                x, y = _to(without_key(x, key) if strip else x, device), _to(y, device)
                out = read(model_wrapper.forward(x))
                total += self._update(out.unsqueeze(0), y).cpu()
                weight += self._weight(y)
        return float(self._compute(total, weight)[0])


class Loss(DatasetMetric):
    """``loss_fn(model(inputs), target)`` over one batch or a whole DataLoader.

    With a per-batch mean (the default reduction of torch losses) the value over several
    batches is the exact dataset mean: each batch's mean is weighted by its sample count, and
    for cross-entropy by its number of counted targets (not ``ignore_index``; the sum of their
    class weights with ``weight=``). With ``reduction="sum"`` the value is the dataset sum.

    Cross-entropy (``nn.CrossEntropyLoss`` or ``F.cross_entropy``) over sequence outputs
    ``(N, T, C)`` with targets ``(N, T)`` counts every position whose target is not the
    loss's ``ignore_index``: the value is ``F.cross_entropy`` over the flattened positions.

    Args:
        loss_fn: ``loss_fn(outputs, target) -> scalar``.
        inputs, target, name, output, target_key: see :class:`DatasetMetric`.
        shift: compare the output at position t with the target at t + 1 (causal language
            models: equals the loss HuggingFace's ``...ForCausalLM`` returns with ``labels``).

    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    >>> _ = nn.init.zeros_(model.bias)
    >>> round(Loss(nn.CrossEntropyLoss(), x, y)(model), 4)
    0.6931
    """

    default_name = "loss"

    def __init__(
        self, loss_fn: Callable[..., torch.Tensor], inputs: Any, target: Any = None, *,
        name: str | None = None, shift: bool = False, output: OutputSpec | None = None,
        target_key: str = "labels",
    ):
        if not callable(loss_fn):
            raise ConfigurationError("Loss: loss_fn must be callable(outputs, target).")
        super().__init__(inputs, target, name=name, output=output, target_key=target_key)
        self.loss_fn = loss_fn
        self.shift = bool(shift)
        self._ce = _as_cross_entropy(loss_fn)
        self._sum = getattr(loss_fn, "reduction", "mean") == "sum"
        self._counts: tuple[weakref.ref, float] | None = None

    def _weight(self, target: Any) -> float:
        if self._sum:
            return 1.0
        if self._ce is not None and isinstance(target, torch.Tensor) and not target.is_floating_point():
            cached = self._counts
            if cached is not None and cached[0]() is target:
                return cached[1]  # the same batch again (the next chunk of points)
            count = _counted(_shifted_target(target, self.shift), self._ce.ignore_index, self._ce.weight)
            self._counts = (weakref.ref(target), count)
            return count
        return super()._weight(target)

    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        scale = self._weight(target)  # of the shifted target, with shift=True
        if self.shift:
            outputs, target = _shift(outputs, target)
        if self._ce is not None and isinstance(target, torch.Tensor) and target.dim() >= 2 and _class_last(outputs, target):
            return _cross_entropy_sums(outputs, target, self._ce)  # every counted position
        if scale == 0:  # every target ignored: the batch adds nothing (its mean would be NaN)
            return torch.zeros(outputs.shape[0], dtype=torch.float64)
        fast = self._batched(outputs, target)
        if fast is not None:
            return fast * scale
        values = [self.loss_fn(o, target) for o in outputs]
        return torch.stack([v.detach().reshape(()) for v in values]).double() * scale

    def _compute(self, total: torch.Tensor, weight: float) -> torch.Tensor:
        return total if self._sum else total / weight  # reduction="sum": the dataset's sum

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_counts": None}

    def _batched(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Per-point batch means without a Python loop, for the common losses."""
        fn, m = self.loss_fn, outputs.shape[0]
        if m == 1 or getattr(fn, "reduction", None) != "mean" or not isinstance(target, torch.Tensor):
            return None
        if type(fn) is nn.CrossEntropyLoss and fn.weight is None and outputs.dim() == 3 and target.dim() == 1:
            if bool((target == fn.ignore_index).any()):
                return None  # the mean is over non-ignored targets: leave it to loss_fn
            if fn.label_smoothing == 0:
                # logsumexp − the target's logit: 4× faster than cross_entropy's log_softmax
                # over many short rows (W-MLP: 64 points × 1797 samples × 10 classes)
                picked = outputs.gather(-1, target.view(1, -1, 1).expand(m, -1, 1)).squeeze(-1)
                return (torch.logsumexp(outputs, dim=-1) - picked).double().mean(dim=1)
            flat = outputs.reshape(-1, outputs.shape[-1])
            per = F.cross_entropy(
                flat, target.repeat(m), reduction="none", ignore_index=fn.ignore_index,
                label_smoothing=fn.label_smoothing,
            )
            return per.reshape(m, -1).double().mean(dim=1)
        if type(fn) is nn.MSELoss and outputs.shape[1:] == target.shape:
            per = (outputs - target.unsqueeze(0)).double().pow(2)
            return per.reshape(m, -1).mean(dim=1)
        return None


class Perplexity(DatasetMetric):
    """``exp`` of the mean cross-entropy over every counted position (token), exact over batches.

    Outputs ``(N, T, C)`` with targets ``(N, T)`` (or ``(N, C)`` with ``(N,)``); positions whose
    target is ``ignore_index`` are skipped; ``shift=True`` for causal language models.
    """

    default_name = "perplexity"

    def __init__(
        self, inputs: Any, target: Any = None, *, name: str | None = None, ignore_index: int = -100,
        shift: bool = False, output: OutputSpec | None = None, target_key: str = "labels",
    ):
        super().__init__(inputs, target, name=name, output=output, target_key=target_key)
        self.ignore_index, self.shift = int(ignore_index), bool(shift)
        self._ce = nn.CrossEntropyLoss(ignore_index=self.ignore_index)

    def _weight(self, target: Any) -> float:
        return _counted(_shifted_target(_tensor_target(target, self), self.shift), self.ignore_index, None)

    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        target = _tensor_target(target, self)
        if self.shift:
            outputs, target = _shift(outputs, target)
        if not _class_last(outputs, target):
            raise ShapeMismatchError(_class_shape_message(self, outputs, target))
        return _cross_entropy_sums(outputs, target, self._ce)

    def _compute(self, total: torch.Tensor, weight: float) -> torch.Tensor:
        return torch.exp(total / weight)


class Accuracy(DatasetMetric):
    """Fraction of targets whose arg-max output (or positive logit, for one output) is the target.

    Sequence outputs ``(N, T, C)`` with targets ``(N, T)`` count every position whose target is
    not ``ignore_index``; ``shift=True`` compares position t with the target at t + 1.
    """

    default_name = "accuracy"

    def __init__(
        self, inputs: Any, target: Any = None, *, name: str | None = None, ignore_index: int = -100,
        shift: bool = False, output: OutputSpec | None = None, target_key: str = "labels",
    ):
        super().__init__(inputs, target, name=name, output=output, target_key=target_key)
        self.ignore_index, self.shift = int(ignore_index), bool(shift)

    def _weight(self, target: Any) -> float:
        target = _shifted_target(_tensor_target(target, self), self.shift)
        if target.is_floating_point():
            return float(target.numel())
        return _counted(target, self.ignore_index, None)

    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        target = _tensor_target(target, self)
        if self.shift:
            outputs, target = _shift(outputs, target)
        m = outputs.shape[0]
        if outputs.dim() >= 3 and outputs.shape[-1] > 1 and math.prod(outputs.shape[1:-1]) == target.numel():
            pred = outputs.argmax(dim=-1).reshape(m, -1)
        else:
            pred = (outputs.reshape(m, -1) > 0).long()
        flat = target.reshape(1, -1)
        correct = pred == flat.to(pred.dtype)
        if not target.is_floating_point() and bool((flat == self.ignore_index).any()):
            correct &= flat != self.ignore_index
        return correct.sum(dim=1).double()


class ModelLoss(DatasetMetric):
    """The loss the model computes itself (a HuggingFace model given ``labels``: ``output.loss``).

    Each batch's value is weighted by its number of counted targets (labels not
    ``ignore_index``, shifted by one with ``shift=True`` as causal language models do), so the
    value over several batches is the dataset mean the model's own loss would give; without
    targets in the batch, by its number of samples.
    """

    default_name = "loss"
    default_output: OutputSpec | None = "loss"
    needs_target = False

    def __init__(
        self, inputs: Any, target: Any = None, *, name: str | None = None, ignore_index: int = -100,
        shift: bool = False, output: OutputSpec | None = None, target_key: str = "labels",
    ):
        super().__init__(inputs, target, name=name, output=output, target_key=target_key)
        self.ignore_index, self.shift = int(ignore_index), bool(shift)

    def _weight(self, target: Any) -> float:
        if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dim() > 0:
            return _counted(_shifted_target(target, self.shift), self.ignore_index, None)
        return super()._weight(target) if target is not None else 1.0

    def _update(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        m = outputs.shape[0]
        if outputs[0].numel() != 1:
            raise ShapeMismatchError(
                f"metric {self.name!r} (ModelLoss) reads one loss per point, got an output of shape "
                f"{tuple(outputs.shape[1:])}; set output='loss' or to a callable returning the "
                "model's scalar loss."
            )
        scale = self._weight(target)
        if scale == 0:
            return torch.zeros(m, dtype=torch.float64)
        return outputs.reshape(m).double() * scale


def _as_cross_entropy(fn: Any) -> nn.CrossEntropyLoss | None:
    """The cross-entropy ``fn`` computes, when it is plain ``nn.CrossEntropyLoss`` or ``F.cross_entropy``."""
    if type(fn) is nn.CrossEntropyLoss and fn.reduction in ("mean", "sum"):
        return fn
    if fn is F.cross_entropy:
        return nn.CrossEntropyLoss()
    return None


def _tensor_target(target: Any, metric: DatasetMetric) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise ConfigurationError(
            f"metric {metric.name!r} ({type(metric).__name__}) needs a tensor target, got "
            f"{type(target).__name__}; give the targets as one tensor."
        )
    return target


def _class_last(outputs: torch.Tensor, target: Any) -> bool:
    """Whether ``outputs`` ``(m, N, ..., C)`` holds class scores for each entry of ``target``
    ``(N, ...)`` along its last dim (class-index targets)."""
    return (
        isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dim() >= 1
        and outputs.dim() == target.dim() + 2 and outputs.shape[1:-1] == target.shape
    )


def _class_shape_message(metric: DatasetMetric, outputs: torch.Tensor, target: torch.Tensor) -> str:
    return (
        f"metric {metric.name!r}: outputs of shape {tuple(outputs.shape[1:])} do not hold class "
        f"scores (last dim) for targets of shape {tuple(target.shape)}; expected outputs (N, C) "
        "with targets (N,), or (N, T, C) with (N, T)."
    )


def _shift(outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output at position t against the target at t + 1: ``(m, N, T, C)``, ``(N, T)`` →
    ``(m, N, T-1, C)``, ``(N, T-1)``."""
    return outputs[:, :, :-1], target[:, 1:]


def _shifted_target(target: torch.Tensor, shift: bool) -> torch.Tensor:
    return target[:, 1:] if shift else target


def _counted(target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> float:
    """Entries of a class-index ``target`` that count: not ``ignore_index`` (their class
    weights' sum with ``weight``)."""
    if target.is_floating_point():  # class probabilities: one sample per row
        return float(target.shape[0]) if target.dim() > 0 else 1.0
    valid = target != ignore_index
    if weight is not None:
        return float(weight.to(target.device)[target[valid]].double().sum())
    return float(valid.sum()) if target.dim() > 0 else float(valid)


def _cross_entropy_sums(outputs: torch.Tensor, target: torch.Tensor, fn: nn.CrossEntropyLoss) -> torch.Tensor:
    """Per-point sums of the cross-entropy at every counted position: outputs ``(m, N, ..., C)``,
    targets ``(N, ...)`` → ``(m,)``; with ``reduction="mean"`` dividing by :func:`_counted`
    gives ``F.cross_entropy`` over all positions."""
    m, c = outputs.shape[0], outputs.shape[-1]
    logits = outputs.reshape(m, -1, c)
    flat = target.reshape(-1)
    if fn.label_smoothing == 0 and fn.weight is None:
        valid = flat != fn.ignore_index
        safe = flat if bool(valid.all()) else torch.where(valid, flat, torch.zeros_like(flat))
        picked = logits.gather(-1, safe.view(1, -1, 1).expand(m, -1, 1)).squeeze(-1)
        per = torch.logsumexp(logits, dim=-1) - picked
        if safe is not flat:
            per = per.masked_fill(~valid, 0.0)
        return per.double().sum(dim=1)
    per = F.cross_entropy(
        logits.reshape(-1, c), flat.repeat(m), weight=fn.weight, reduction="none",
        ignore_index=fn.ignore_index, label_smoothing=fn.label_smoothing,
    )
    return per.reshape(m, -1).double().sum(dim=1)


def flatten_metrics(metric: Metric | Sequence[Metric]) -> list[Metric]:
    """The leaf metrics of a metric, a pipeline or a list, in order."""
    if isinstance(metric, MetricPipeline):
        return [leaf for m in metric.metrics for leaf in flatten_metrics(m)]
    if isinstance(metric, Metric):
        return [metric]
    if isinstance(metric, Sequence) and not isinstance(metric, str):
        return [leaf for m in metric for leaf in flatten_metrics(m)]
    raise ConfigurationError(
        f"metric must be a landscapes Metric (Loss, Accuracy, a Metric subclass) or a list of "
        f"them, got {type(metric).__name__}."
    )


def metric_names(metrics: Sequence[Metric]) -> list[str]:
    """Unique names: a metric's ``name`` or its class name, with ``_1``, ``_2`` on repeats."""
    names: list[str] = []
    for m in metrics:
        base = getattr(m, "name", None) or type(m).__name__.lower()
        name, n = base, 1
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _device_of(model_wrapper: ModelWrapper | nn.Module) -> torch.device:
    module = model_wrapper.root if isinstance(model_wrapper, ModelWrapper) else model_wrapper
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _to(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or tuples, lists and mappings of tensors, nested) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    return map_tensors(lambda t: t.to(device, non_blocking=True), x)
