"""Build library objects (model, data, metrics, grid axes) from the typed config sections."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object, instantiate
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import landscapes as L
from landscapes.adapters import first_tensor, map_tensors
from landscapes.checkpoints import load_into, load_state_dict
from landscapes.errors import ConfigurationError, MetricValueError
from pipelines.config import AdaptersConfig, DataConfig, GridConfig, MetricsConfig, PipelineConfig


def instantiate_or_explain(spec: Mapping[str, Any], key: str, *, hint: str = "", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(spec, **kwargs)``; a failure names ``key``, the target and the
    innermost cause in one line (Hydra's own message starts with its wrapper)."""
    target = spec.get("_target_")
    try:
        return instantiate(dict(spec), **kwargs)
    except Exception as err:
        raise ConfigurationError(
            f"{key}: cannot instantiate {target!r}: {describe_cause(err)}; check {key}._target_ and its "
            f"keyword arguments{f' ({hint})' if hint else ''}."
        ) from err


def describe_cause(err: BaseException) -> str:
    """``Type: first line`` of the error Hydra wrapped (the model's own ``TypeError``, the
    ``ModuleNotFoundError`` behind "Error locating target"), or of ``err`` itself."""
    from hydra.errors import InstantiationException

    seen: set[int] = set()
    while id(err) not in seen and err.__cause__ is not None and (
        isinstance(err, InstantiationException) or (isinstance(err, ImportError) and isinstance(err.__cause__, ImportError))
    ):
        seen.add(id(err))
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else repr(err)}"


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``model._target_`` with its keyword arguments."""
    if "_target_" not in model_cfg or model_cfg["_target_"] in (None, "???"):
        raise ConfigurationError(
            "model._target_ is missing: name the model class, e.g. model=custom model._target_=my_pkg.Net."
        )
    model = instantiate_or_explain(model_cfg, "model", hint="use model=custom to start from no kwargs")
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
    dataset = instantiate_or_explain(dataset_cfg, "data.dataset")
    if not isinstance(dataset, Dataset | list):  # a list of samples is a map-style dataset too
        raise ConfigurationError(
            f"data.dataset._target_={dataset_cfg['_target_']!r} returned a {type(dataset).__name__}, not a torch "
            "Dataset; return a torch.utils.data.Dataset of samples (e.g. TensorDataset(x, y), or a dataset of "
            "mappings such as {'input_ids': ..., 'labels': ...})."
        )
    limit = data_cfg.limit
    if limit is not None:
        dataset = Subset(dataset, range(min(int(limit), len(dataset))))
    if len(dataset) == 0:
        raise ConfigurationError("data: the dataset is empty; check data.dataset and data.limit.")
    return dataset


def build_data(data_cfg: DataConfig) -> tuple[Any, Any]:
    """``(inputs, target)`` of one batch when ``batch_size`` is null, else ``(DataLoader, None)``.

    Samples may be ``(x, y)`` pairs or mappings (``{"input_ids": ..., "labels": ...}``): a
    mapping batch is ``(batch, None)``, and the metrics read its targets under
    ``metrics.target_key``.
    """
    dataset = build_dataset(data_cfg)
    batch_size = data_cfg.batch_size
    if batch_size is None:
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            x, y = dataset.tensors
            return x, y
        batch = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
        if isinstance(batch, Mapping):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
            return x, y
        raise ConfigurationError(
            f"data.dataset: its samples are {_kind(batch)}; a sample must be an (inputs, target) "
            "pair or a mapping with the targets under metrics.target_key (e.g. {'input_ids': ..., "
            "'labels': ...})."
        )
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False), None


def _kind(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}s of {len(batch)}"
    return f"{type(batch).__name__}s"


BUILT_IN_METRICS = ("loss", "accuracy", "perplexity")


def build_metrics(metrics_cfg: MetricsConfig, data: tuple[Any, Any]) -> list[L.Metric]:
    """The configured metrics on the same data, in store order (see :func:`metric_names`).

    ``loss`` (``Loss(metrics.loss)``, or ``ModelLoss`` with ``model_loss``), ``accuracy`` and
    ``perplexity`` share one forward pass per batch; each of ``metrics.extra`` is a
    ``landscapes.Metric`` subclass (a ``DatasetMetric`` subclass is given the data and shares
    the forward pass too) or a function ``f(model, batch) -> float``.
    """
    inputs, target = data
    tokens = {"shift": metrics_cfg.shift, "target_key": metrics_cfg.target_key}
    counted = {"ignore_index": metrics_cfg.ignore_index, **tokens}
    if metrics_cfg.model_loss:
        metrics: list[L.Metric] = [L.ModelLoss(inputs, target, name="loss", **counted)]
    else:
        loss_fn = build_loss(metrics_cfg)
        metrics = [L.Loss(loss_fn, inputs, target, name="loss", **tokens)]
    if metrics_cfg.accuracy:
        metrics.append(L.Accuracy(inputs, target, name="accuracy", **counted))
    if metrics_cfg.perplexity:
        metrics.append(L.Perplexity(inputs, target, name="perplexity", **counted))
    for name, spec in (metrics_cfg.extra or {}).items():
        metrics.append(build_extra_metric(str(name), spec, data, metrics_cfg))
    return metrics


def build_loss(metrics_cfg: MetricsConfig) -> Any:
    """``metrics.loss`` instantiated; ``metrics.ignore_index`` reaches a loss that takes one."""
    loss_cfg = dict(metrics_cfg.loss or {})
    if "_target_" not in loss_cfg:
        raise ConfigurationError(
            "metrics.loss._target_ is missing, e.g. torch.nn.CrossEntropyLoss (or metrics.model_loss=true "
            "for the loss the model returns itself)."
        )
    ignore = metrics_cfg.ignore_index
    if "ignore_index" in loss_cfg:
        if loss_cfg["ignore_index"] != ignore:
            raise ConfigurationError(
                f"metrics.loss.ignore_index={loss_cfg['ignore_index']} but metrics.ignore_index={ignore}: "
                "the loss and the other metrics would count different targets; set metrics.ignore_index "
                "only (it reaches the loss)."
            )
    elif ignore != -100 and _takes_keyword(loss_cfg["_target_"], "ignore_index"):
        loss_cfg["ignore_index"] = ignore
    loss_fn = instantiate_or_explain(loss_cfg, "metrics.loss")
    if not callable(loss_fn):
        raise ConfigurationError(
            f"metrics.loss._target_={loss_cfg['_target_']!r} built a {type(loss_fn).__name__}, not a "
            "callable loss_fn(output, target)."
        )
    return loss_fn


def check_extra_metric(name: str, spec: Any) -> Any:
    """The object ``metrics.extra.<name>._target_`` names, after checking name and spec."""
    key = f"metrics.extra.{name}"
    if name in BUILT_IN_METRICS:
        raise ConfigurationError(
            f"{key}: {name!r} is a built-in metric's name; give the custom metric another name."
        )
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigurationError(
            f"{key}={spec!r}: give a mapping with a _target_, e.g. "
            f"'+{key}._target_=my_pkg.metrics.{name}' (a landscapes.Metric subclass or a function "
            "f(model, batch) -> float), plus its keyword arguments."
        )
    target = str(spec["_target_"])
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigurationError(
            f"{key}: cannot instantiate {target!r}: {describe_cause(err)}; check {key}._target_."
        ) from err
    if isinstance(obj, type) and not issubclass(obj, L.Metric) or not callable(obj):
        raise ConfigurationError(
            f"{key}._target_={target!r} is a {'class' if isinstance(obj, type) else type(obj).__name__} "
            "but not a landscapes.Metric; give a Metric subclass or a function f(model, batch) -> float."
        )
    return obj


def build_extra_metric(name: str, spec: Any, data: tuple[Any, Any], metrics_cfg: MetricsConfig) -> L.Metric:
    """``metrics.extra.<name>``: a ``landscapes.Metric`` subclass or a function ``f(model, batch)``.

    A ``DatasetMetric`` subclass is called as ``cls(inputs, target, name=name, **kwargs)``
    (with ``target_key=metrics.target_key`` when it takes one), so it shares the forward pass
    of the built-in metrics; another ``Metric`` subclass as ``cls(**kwargs)``; a function is
    wrapped in :class:`FunctionMetric`.
    """
    key = f"metrics.extra.{name}"
    obj = check_extra_metric(name, spec)
    target = str(spec["_target_"])
    partial = instantiate_or_explain({**spec, "_partial_": True}, key)
    if isinstance(obj, type):
        call: dict[str, Any] = {}
        args: tuple[Any, ...] = ()
        if issubclass(obj, L.DatasetMetric):
            args, call = tuple(data), {"name": name}
            if "target_key" not in spec and _takes_keyword(target, "target_key"):
                call["target_key"] = metrics_cfg.target_key
        try:
            made = partial(*args, **call)
        except Exception as err:
            raise ConfigurationError(
                f"{key}: cannot instantiate {target!r}: {describe_cause(err)}; check {key}._target_ and its "
                "keyword arguments."
            ) from err
        made.name = name
        return made
    return FunctionMetric(partial, data, name=name, target=target, target_key=metrics_cfg.target_key)


class FunctionMetric(L.Metric):
    """A function ``f(model, batch) -> float`` as a metric: at each point, the mean of ``f``
    over the data's batches, each weighted by its number of samples (one batch: ``f`` itself).

    ``model`` is the ``nn.Module`` at the point (eval mode, no gradients); ``batch`` is what the
    data yields, on the model's device: ``(inputs, target)``, or a mapping.
    """

    def __init__(self, fn: Any, data: tuple[Any, Any], *, name: str, target: str, target_key: str = "labels"):
        self.fn, self.name, self.target, self.target_key = fn, name, target, target_key
        inputs, labels = data
        self.batches: Any = [(inputs, labels) if labels is not None else inputs] if not isinstance(inputs, DataLoader) else inputs

    def __call__(self, model_wrapper: Any) -> float:
        module = getattr(model_wrapper, "root", model_wrapper)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        total, weight = 0.0, 0.0
        with torch.no_grad():
            for n, batch in enumerate(self.batches):
                value = self.fn(module, map_tensors(lambda t: t.to(device), batch))
                number = self._number(value, n)
                size = _batch_size(batch, self.target_key)
                total += number * size
                weight += size
        return total / weight if weight else float("nan")

    def _number(self, value: Any, n: int) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            return float(value.detach().cpu().reshape(()))
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise MetricValueError(
            f"metrics.extra.{self.name}: {self.target}(model, batch) returned {shown} (a {type(value).__name__}) "
            f"on batch {n}; a metric function must return one number (a float, an int or a one-element tensor)."
        )


def _batch_size(batch: Any, target_key: str) -> float:
    if isinstance(batch, Mapping):
        t = batch.get(target_key)
        t = t if isinstance(t, torch.Tensor) else first_tensor(batch)
    else:
        t = first_tensor(batch)
    return float(t.shape[0]) if t is not None and t.dim() > 0 else 1.0


def _takes_keyword(target: str, name: str) -> bool:
    """Whether the callable at ``target`` accepts the keyword ``name`` (False if unknown)."""
    try:
        obj = get_object(target)
        params = inspect.signature(obj).parameters
    except Exception:
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def metric_names(metrics_cfg: MetricsConfig) -> list[str]:
    """The store's metric arrays, in order: loss, accuracy, perplexity, then ``metrics.extra``."""
    names = ["loss"]
    names += ["accuracy"] if metrics_cfg.accuracy else []
    names += ["perplexity"] if metrics_cfg.perplexity else []
    return names + [str(n) for n in (metrics_cfg.extra or {})]


def build_adapter(spec: Any, key: str) -> Any:
    """``adapters.forward`` / ``adapters.output`` as the library takes them: a string, an index,
    or the callable a ``{_target_: ...}`` mapping names (its other keys bound as keywords)."""
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ConfigurationError(f"{key}={dict(spec)!r}: give one of the options or {{_target_: my_pkg.fn}}.")
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        try:
            fn = get_object(str(spec["_target_"]))
        except Exception as err:
            raise ConfigurationError(
                f"{key}: cannot find {spec['_target_']!r}: {describe_cause(err)}; check {key}._target_."
            ) from err
        return functools.partial(fn, **kwargs) if kwargs else fn
    return spec


def build_adapters(adapters_cfg: AdaptersConfig) -> tuple[L.Forward, L.Output]:
    """The ``Forward`` and ``Output`` adapters; a bad option names its config key."""
    built = []
    for key, cls in (("forward", L.Forward), ("output", L.Output)):
        spec = build_adapter(getattr(adapters_cfg, key), f"adapters.{key}")
        try:
            built.append(cls(spec))
        except ConfigurationError as err:
            raise ConfigurationError(f"adapters.{key}: {err}") from err
    forward, output = built
    return forward, output


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


def _check_target(spec: Mapping[str, Any] | None, key: str, *, hint: str = "") -> None:
    """Import what ``<key>._target_`` names (without calling it), so a misspelt class fails
    before any run is opened, with the message :func:`instantiate_or_explain` gives."""
    target = (spec or {}).get("_target_")
    if not isinstance(target, str) or target == "???":
        return
    try:
        get_object(target)
    except Exception as err:
        raise ConfigurationError(
            f"{key}: cannot instantiate {target!r}: {describe_cause(err)}; check {key}._target_ and its "
            f"keyword arguments{f' ({hint})' if hint else ''}."
        ) from err


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
    for key in ("memory_budget", "max_batch_points"):
        value = getattr(cfg.compute, key)
        if value is not None and value < 1:
            raise ConfigurationError(
                f"compute.{key}={value}: expected a positive integer (bytes per tile for memory_budget, grid "
                f"points per tile for max_batch_points), or null for the default."
            )
    _check_target(cfg.model, "model", hint="use model=custom to start from no kwargs")
    _check_target(cfg.data.dataset, "data.dataset")
    if not cfg.metrics.model_loss:
        _check_target(cfg.metrics.loss, "metrics.loss")
    build_adapters(cfg.adapters)
    if cfg.compute.bn_batches < 1:
        raise ConfigurationError(
            f"compute.bn_batches={cfg.compute.bn_batches}: give a positive number of batches."
        )
    for name, spec in (cfg.metrics.extra or {}).items():
        check_extra_metric(str(name), spec)
    towards = cfg.directions.towards or []
    if cfg.directions.kind == "checkpoints" and len(towards) != len(axes):
        n = len(axes)
        raise ConfigurationError(
            f"directions.towards has {len(towards)} checkpoint(s) but grid.dims={n}; give {n} "
            f"checkpoint(s) to move towards (directions.towards=[a.pt{', b.pt' if n == 2 else ''}])."
        )
