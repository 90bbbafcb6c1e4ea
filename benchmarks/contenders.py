"""The contenders: our engine (per strategy and tile size), a plain per-point loop, and
``loss-landscapes`` 3.0.6. Each evaluates the same model, data and grid size."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from benchmarks.workloads import Workload, precision_context

__all__ = [
    "Contender",
    "Directions",
    "EngineContender",
    "LossLandscapesContender",
    "PerPointLoop",
    "RunOutput",
    "all_contenders",
    "engine_contenders",
    "engine_strategies",
    "make_directions",
]

Directions = list[dict[str, torch.Tensor]]


@dataclass
class RunOutput:
    """Values on the grid (``steps × steps``) and what the contender reports about itself."""

    values: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class Contender(Protocol):
    """Something that computes a loss landscape of a workload."""

    name: str
    same_directions: bool  # True: uses the shared directions, so its values are comparable

    def run(self, workload: Workload, directions: Directions) -> RunOutput: ...


def make_directions(model: nn.Module) -> Directions:
    """The two filter-normalized Gaussian directions (seeds 0 and 1) from `landscapes`."""
    try:
        from landscapes import random_direction
    except ImportError:  # the package's public names are not exported yet
        from landscapes.directions import random_direction

    return [
        random_direction(model, normalization="filter", ignore="biasbn", seed=s) for s in (0, 1)
    ]


# --------------------------------------------------------------------------- our engine


def engine_strategies() -> tuple[str, ...]:
    """The strategies `landscapes.evaluate` offers, read from its signature (``"auto"`` excluded)."""
    import typing

    import landscapes

    param = inspect.signature(landscapes.evaluate).parameters.get("strategy")
    choices: tuple[str, ...] = ()
    if param is not None:
        ann = param.annotation
        if isinstance(ann, str):  # postponed annotations: resolve from the module
            hints = typing.get_type_hints(landscapes.evaluate)
            ann = hints.get("strategy", ann)
        choices = tuple(a for a in typing.get_args(ann) if isinstance(a, str))
    return tuple(c for c in choices if c != "auto") or ("loop", "vmap", "batched")


@dataclass
class EngineContender:
    """``landscapes.evaluate`` with a fixed strategy and tile size (``None``: its own choice)."""

    strategy: str = "auto"
    max_batch_points: int | None = None
    compile: str | None = None  # None: evaluate's default ("auto")
    same_directions: bool = True

    @property
    def name(self) -> str:
        if self.strategy == "auto" and self.max_batch_points is None and self.compile is None:
            return "engine default"
        tile = "auto" if self.max_batch_points is None else str(self.max_batch_points)
        return f"engine {self.strategy} M={tile}" + ("" if self.compile is None else f" compile={self.compile}")

    def run(self, workload: Workload, directions: Directions) -> RunOutput:
        import landscapes

        if workload.batches is not None:  # dict batches, labels inside: the model's own next-token loss
            metric = landscapes.ModelLoss(workload.batches, shift=True)
        else:
            metric = landscapes.Loss(nn.CrossEntropyLoss(), workload.inputs, workload.targets)
        kwargs: dict[str, Any] = {"strategy": self.strategy, "device": None, "precision": workload.precision}
        if self.max_batch_points is not None:
            kwargs["max_batch_points"] = self.max_batch_points
        if self.compile is not None:
            kwargs["compile"] = self.compile
        torch._dynamo.reset()  # every run compiles afresh, as a new process would (inductor's disk cache stays)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            land = landscapes.evaluate(workload.model, metric, directions, workload.axes, **kwargs)
        meta = dict(getattr(land, "metadata", {}) or {})
        info = {
            k: meta[k]
            for k in ("strategy", "tile_points", "pass_points", "tile_shape", "strategy_reason", "memory_budget", "precision", "compile")
            if k in meta
        }
        if caught:
            info["warnings"] = sorted({str(w.message) for w in caught})
        return RunOutput(np.asarray(land.values["loss"], dtype=np.float64), info)


def engine_contenders(workload: Workload, *, quick: bool = False) -> list[EngineContender]:
    """The default first, then every strategy at its own tile size (``M=auto``) and, unless
    ``quick``, at each of the workload's tile sizes that fit the grid."""
    out = [EngineContender()]
    for strategy in engine_strategies():
        out.append(EngineContender(strategy, None))
        if not quick:
            out += [
                EngineContender(strategy, m) for m in workload.tile_sizes if m < workload.points
            ]
    if workload.compile_candidates:  # the loop's forwards compiled and not, whatever auto decides
        out += [EngineContender("loop", None, compile="on"), EngineContender("loop", None, compile="off")]
    return out


# --------------------------------------------------------------------------- plain loop


@dataclass
class PerPointLoop:
    """The obvious way: one deep copy, then per point set θ = θ0 + a·d1 + b·d2 in place under
    ``torch.no_grad()``, forward the whole batch, ``loss.item()`` (a language model: the
    model's own loss on each dict batch, weighted by its counted tokens)."""

    name: str = "per-point loop"
    same_directions: bool = True

    def run(self, workload: Workload, directions: Directions) -> RunOutput:
        model = copy.deepcopy(workload.model).eval()
        params = dict(model.named_parameters())
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        d1, d2 = directions
        loss_fn = nn.CrossEntropyLoss()
        xs, ys = workload.axes
        out = np.empty((len(xs), len(ys)))
        with torch.no_grad(), precision_context(workload.precision, workload.device):
            for i, a in enumerate(xs.tolist()):
                for j, b in enumerate(ys.tolist()):
                    for n, p in params.items():
                        p.copy_(theta0[n] + a * d1[n] + b * d2[n])
                    if workload.batches is None:
                        out[i, j] = loss_fn(model(workload.inputs), workload.targets).item()
                    else:
                        out[i, j] = _lm_loss(lambda batch: model(**batch), workload.batches)
        return RunOutput(out)


def _lm_loss(forward: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """The next-token loss over every counted token of ``batches``: each batch's own
    ``model(**batch).loss`` (a mean over its shifted labels) weighted by its token count."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += forward(batch).loss.float().item() * n
        count += n
    return total / count


# --------------------------------------------------------------------------- loss-landscapes


@contextlib.contextmanager
def _directions_on(device: torch.device) -> Iterator[None]:
    """loss-landscapes 3.0.6 draws its directions with ``torch.rand`` on the CPU, which fails
    for a CUDA model; on CUDA, draw them on the model's device instead (nothing else changes)."""
    if device.type == "cpu":
        yield
        return
    import loss_landscapes.main as ll_main
    import loss_landscapes.model_interface.model_parameters as ll_params

    original = ll_params.rand_u_like

    def rand_u_like(example: Any) -> Any:
        ref = example[0]
        return ll_params.ModelParameters(
            [torch.rand(p.size(), dtype=ref.dtype, device=p.device) for p in example]
        )

    ll_params.rand_u_like = ll_main.rand_u_like = rand_u_like
    try:
        yield
    finally:
        ll_params.rand_u_like = ll_main.rand_u_like = original


@dataclass
class LossLandscapesContender:
    """``loss_landscapes.random_plane(..., distance=1, steps, normalization='filter',
    deepcopy_model=True)``: uniform directions and its own grid (a speed reference only)."""

    name: str = "loss-landscapes 3.0.6"
    same_directions: bool = False

    def run(self, workload: Workload, directions: Directions) -> RunOutput:
        if importlib.util.find_spec("loss_landscapes") is None:
            raise ModuleNotFoundError("loss-landscapes 3.0.6 is not installed: skipped (pip install loss-landscapes==3.0.6)")
        import loss_landscapes
        import loss_landscapes.metrics

        model: Any = workload.model
        if workload.batches is None:
            metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), workload.inputs, workload.targets)
        else:  # a language model: its GeneralModelWrapper runs model(**batch)
            from loss_landscapes.model_interface.model_wrapper import GeneralModelWrapper

            model = GeneralModelWrapper(workload.model, [workload.model], lambda m, batch: m(**batch))
            metric = _LLTokenLoss(workload.batches)
        # its filter normalization divides by each bias element's norm after scaling the bias to
        # θ0's, so an all-zero bias (GPT-2's at initialization) raises ZeroDivisionError: on the
        # language model it runs unnormalized (a speed reference; its values are not compared)
        normalization = "filter" if workload.batches is None else None
        torch.manual_seed(0)  # it draws from the global generator
        with (
            _directions_on(workload.device),
            precision_context(workload.precision, workload.device),
        ):
            values = loss_landscapes.random_plane(
                model,
                metric,
                distance=1,
                steps=workload.steps,
                normalization=normalization,
                deepcopy_model=True,
            )
        return RunOutput(np.asarray(values, dtype=np.float64), {"normalization": str(normalization)})


class _LLTokenLoss:
    """A loss-landscapes ``Metric`` (``metric(model_wrapper) -> float``): the next-token loss
    over dict batches, through the wrapper's ``forward``."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __call__(self, model_wrapper: Any) -> float:
        with torch.no_grad():
            return _lm_loss(model_wrapper.forward, self.batches)


def all_contenders(
    workload: Workload, *, with_engine: bool = True, quick: bool = False
) -> list[Contender]:
    """Every contender for ``workload``: loss-landscapes, the plain loop, then the engine."""
    out: list[Contender] = [LossLandscapesContender(), PerPointLoop()]
    if with_engine:
        out.extend(engine_contenders(workload, quick=quick))
    return out
