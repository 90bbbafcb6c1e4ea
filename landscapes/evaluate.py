"""The evaluation engine: a tile of grid points at a time, with one of three strategies.

- ``"batched"``: hand-batched ``nn.Sequential`` MLPs and CNNs (one ``baddbmm`` or grouped
  convolution per layer for a pass of points, the first layer by linearity; on a CPU, when one point's activations outgrow the
  caches, passes of one point with reused buffers); see :mod:`landscapes.batched`.
- ``"vmap"``: ``torch.func.functional_call`` under ``torch.func.vmap`` over the tile.
- ``"loop"``: one point after another, each point's parameters written into the model
  (computed from θ0 directly, never by stepping) and restored afterwards.

Every strategy shares each data batch across the tile's points, and computes every point as
``origin + Σ cᵢ·basisᵢ`` from scratch: one matrix product per chunk of the tile (vmap,
batched), or written parameter by parameter straight into the model (loop). The forwards run
in fp32, TF32 (CUDA) or bf16 autocast (``precision``); the metrics sum in float64.

A batch may be a tensor, a tuple or a mapping (nested); the ``forward`` adapter says how it
reaches the model and the ``output`` adapter what of the output the metrics read (see
:mod:`landscapes.adapters`). BatchNorm runs with θ0's running statistics (``eval``), batch
statistics (``train``), or statistics re-estimated at each point (``recompute_bn``, see
:mod:`landscapes.bn`; per point in the loop, or for a chunk of points with per-point buffers
under vmap); dropout stays off unless the model's own modes are kept (``as_is``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from landscapes import allocator, batched, compiled
from landscapes._checks import check_choice, check_positive_int
from landscapes.adapters import (
    Forward,
    ForwardSpec,
    Output,
    OutputSpec,
    map_tensors,
    tensor_bytes,
    without_key,
)
from landscapes.bn import (
    BN_MODULES,
    batchnorm_modules,
    estimating_statistics,
    point_statistics,
    recalibrate_bn,
)
from landscapes.errors import (
    ConfigurationError,
    EvaluationError,
    FallbackWarning,
    LandscapesError,
    LandscapesWarning,
    MetricValueError,
    ShapeMismatchError,
)
from landscapes.grid import Grid, Tile, tile_shape_for
from landscapes.landscape import Landscape
from landscapes.metrics import DatasetMetric, Metric, _device_of, _to, flatten_metrics, metric_names
from landscapes.params import ParameterSpace
from landscapes.wrappers import ModelWrapper, SimpleModelWrapper, wrap_model

__all__ = ["Evaluator", "evaluate", "evaluate_tile", "Strategy", "ModelMode", "Precision"]

Strategy = Literal["auto", "loop", "vmap", "batched"]
ModelMode = Literal["eval", "train", "recompute_bn", "as_is"]
STRATEGIES = ("auto", "loop", "vmap", "batched")
MODEL_MODES = ("eval", "train", "recompute_bn", "as_is")
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = ("fp32", "tf32", "bf16")
#: Batches that re-estimate BatchNorm statistics at each point with model_mode="recompute_bn".
BN_BATCHES = 10

#: Default memory budget (bytes) for a tile on a CPU; on CUDA half the free memory is used.
CPU_MEMORY_BUDGET = 1 << 30
#: Upper bound on points per tile; keeps tiles a useful unit of progress and of work.
MAX_TILE_POINTS = {"loop": 256, "vmap": 1024, "batched": 256}
#: On a CPU, a batched pass is fastest while its activations stay near the caches: about this
#: many bytes per pass, and at most 64 points (measured on the W-MLP workloads, docs/benchmarks.md).
CPU_BATCHED_TILE_BYTES = 24 << 20
CPU_BATCHED_MAX_POINTS = 64
#: Above this many bytes of activations per point, batched tiles on a CPU run one point per pass
#: (W-MLP on all 1797 samples, 3.7 MiB per point: one point at a time was faster; on 128: 64).
CPU_BATCHED_MAX_POINT_BYTES = 1 << 20
#: On a CPU, a batched CNN pass (grouped convolutions, channels-last) holds at most this many
#: points, within half the memory budget: on W-CNN passes of 4-16 points were within 5 % of
#: each other on a quiet machine, 16 ahead of one under load (docs/benchmarks.md).
CPU_BATCHED_CONV_POINTS = 16
#: Points whose parameters the loop (and one-point batched passes) compute together.
CHUNK_POINTS = 64
#: The loop evaluates a point on every batch of a block of batches (at most this many bytes of
#: data, held on the device) before it moves to the next point: one write of θ per point and
#: block, not per batch (ResNet-18: a θ costs about as much as a forward of 64 images).
LOOP_BLOCK_BYTES = 256 << 20
_TRAIN_ONLY = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)

DirectionLike = Mapping[str, torch.Tensor] | torch.Tensor | np.ndarray


class Evaluator:
    """A prepared evaluation of one subspace ``θ(c) = origin + Σ cᵢ·basisᵢ``.

    It holds everything a tile needs (model, metrics, data, basis), so tiles can be evaluated
    in any order, on any process that has a copy of it. The model is left as it was after
    each call.

    Args:
        model: the model at θ0, or a :class:`ModelWrapper`.
        metric: a metric, a :class:`MetricPipeline`, or a list of metrics.
        directions: k directions, each keyed like ``model.named_parameters()`` (or a flat
            tensor of length n, or a ``(k, n)`` array for all of them). They are read where
            they are, without a copy, when already on the device in the model's dtype (a
            ``(k, n)`` array also contiguous): do not change them in place while evaluating.
            Beyond the model and the directions an evaluation holds one copy of the parameters
            (the origin, which also restores the model) and its working space.
        origin: the point at coordinate 0; default the model's own parameters. Pass a mapping
            of zeros with directions that are models' parameters for interpolations whose
            end points must be exact.
        device: where to evaluate; default the model's device. Another device works on a copy.
        strategy: ``"auto"`` chooses per model (see :meth:`_choose`).
        model_mode: how BatchNorm normalizes (dropout stays off except with ``"as_is"``):
            ``"eval"`` (default) with θ0's running statistics at every point; ``"train"`` with
            each batch's own statistics (forces the loop); ``"recompute_bn"`` with statistics
            re-estimated at each point from the first ``bn_batches`` batches of the first
            metric's data (the same batches at every point; with ``"vmap"`` a chunk of
            points at once, each with its own statistics, else a per-point loop;
            ``"batched"`` becomes ``"vmap"`` with a warning); ``"as_is"`` in the modes the
            model's modules are in.
        memory_budget: bytes a tile may use; sets the tile size.
        max_batch_points: an upper bound on points per tile.
        forward: how a batch reaches the model: ``"auto"`` (``model(x)`` for a tensor,
            ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping), ``"call"``,
            ``"star"``, ``"kwargs"``, or a callable ``forward(model, batch)``.
        output: what of the model's output the metrics read (a metric's own ``output`` wins):
            ``"auto"`` (a tensor itself, else its ``logits`` field, else element 0 of a
            tuple), ``"logits"``, ``"loss"``, an element index, or a callable
            ``output(model_output) -> tensor``.
        bn_batches: with ``model_mode="recompute_bn"``, how many batches re-estimate the
            statistics.
        precision: the forwards' arithmetic: ``"fp32"`` (default; on CUDA with TF32 off during
            the evaluation, whatever the global flags), ``"tf32"`` (CUDA only: TF32 matmuls and
            convolutions, the flags restored afterwards; a CPU raises), ``"bf16"``
            (``torch.autocast`` to bfloat16 around the forwards, on CPU and CUDA). The outputs
            are cast to float32 before the metrics, which sum in float64.
        compile: ``torch.compile`` for the loop strategy's forwards: ``"off"`` (default here),
            ``"on"``, or ``"auto"`` (on when the eager forwards of the grid are estimated to take
            at least :data:`~landscapes.compiled.COMPILE_AFTER_SECONDS`). Decided by
            :meth:`plan_compile`, which :func:`evaluate` calls with the grid's size; a compiled
            forward that fails or differs from the eager one on the first batch is not used.
    """

    def __init__(
        self,
        model: nn.Module | ModelWrapper,
        metric: Metric | Sequence[Metric],
        directions: Sequence[DirectionLike] | torch.Tensor | np.ndarray,
        *,
        origin: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        strategy: Strategy = "auto",
        model_mode: ModelMode = "eval",
        memory_budget: int | None = None,
        max_batch_points: int | None = None,
        forward: ForwardSpec = "auto",
        output: OutputSpec = "auto",
        bn_batches: int = BN_BATCHES,
        precision: Precision = "fp32",
        compile: compiled.CompileMode = "off",  # noqa: A002 - the option is torch.compile
    ):
        strategy = check_choice("strategy", strategy, STRATEGIES, where="evaluate")
        self.compile_mode = check_choice("compile", compile, compiled.COMPILE_MODES, where="evaluate")
        self.compiled = compiled.CompileDecision(
            False, "not asked (compile='off')" if self.compile_mode == "off" else "undecided: plan_compile() was not called")
        self._compiled_forward: Callable[[Any], Any] | None = None
        self.precision = check_choice("precision", precision, PRECISIONS, where="evaluate")
        self.model_mode = check_choice("model_mode", model_mode, MODEL_MODES, where="evaluate")
        check_positive_int("max_batch_points", max_batch_points, where="evaluate", allow_none=True)
        check_positive_int("memory_budget", memory_budget, where="evaluate", allow_none=True)
        self.bn_batches = check_positive_int("bn_batches", bn_batches, where="evaluate")
        self.output_adapter = Output(output)
        self.wrapper = wrap_model(model, forward)
        self.root = self.wrapper.root
        self.device = _resolve_device(device, self.root)
        if _device_of(self.root) != self.device:  # never move the caller's model
            import copy

            self.wrapper = _copy_wrapper(self.wrapper, copy.deepcopy)
            self.root = self.wrapper.root
            self.root.to(self.device)
        if self.precision == "tf32" and self.device.type != "cuda":
            raise ConfigurationError(
                f"evaluate: precision='tf32' needs a CUDA device (TF32 is a tensor-core format), "
                f"the device is {str(self.device)!r}; use precision='fp32', or 'bf16' for lower "
                "precision on a CPU."
            )
        self.functional = type(self.wrapper) is SimpleModelWrapper
        self.space = ParameterSpace.from_module(self.root)
        if self.space.numel == 0:
            raise ConfigurationError("evaluate: the model has no parameters to move.")
        self.dtype = next(self.root.parameters()).dtype

        self.metrics = flatten_metrics(metric)
        self.metric_names = tuple(metric_names(self.metrics))
        self.dataset_metrics = [m for m in self.metrics if isinstance(m, DatasetMetric)]
        self.custom_metrics = [m for m in self.metrics if not isinstance(m, DatasetMetric)]
        self._groups = _group_by_data(self.dataset_metrics)
        # per group: the distinct output adapters its metrics read, and which each one reads
        self._readers = [_readers(group, self.output_adapter) for group in self._groups]
        self._cached_batches: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._bn_inputs: list[Any] | None = None
        self._takes_key: dict[str, bool] = {}
        self._first_cache: dict[int, dict[str, torch.Tensor]] = {}

        # the directions as given, per parameter, without a copy where they already are on the
        # device in the model's dtype; the flat (k, n) basis only when vmap or batched needs it
        self._basis, self._parts = self._stack(directions)
        self.k = len(self._parts)
        # a new tensor: the model's parameters at θ0, which also restore the model afterwards
        self._origin_is_model = origin is None
        if origin is None:
            self.origin = torch.cat([p.detach().reshape(-1) for p in self.root.parameters()])
        else:
            self.origin = self.space.flatten(origin, what="origin").to(self.device, self.dtype)

        self.plan: batched.SequentialPlan | None = None
        self._first: dict[str, Any] | None = None
        self.strategy, self.reason = self._choose(strategy)
        self.tile_points, self.pass_points = self._tile_points(memory_budget, max_batch_points)

    # -- preparation -----------------------------------------------------------------------
    def _stack(self, directions: Any) -> tuple[torch.Tensor | None, list[list[torch.Tensor]]]:
        """The directions as ``(basis, parts)``: a ``(k, n)`` array given as one stays the flat
        basis (no copy when it is already contiguous, on the device, in the model's dtype);
        k directions stay per parameter (``parts[i][j]`` shaped like parameter j, no copy when
        already on the device in the model's dtype), and the basis is built only if asked for."""
        if isinstance(directions, (torch.Tensor, np.ndarray)) and np.ndim(directions) == 2:
            basis = torch.as_tensor(directions)
            if basis.shape[0] == 0:
                raise ConfigurationError("evaluate: directions is empty; give at least one direction.")
            if basis.shape[1] != self.space.numel:
                raise ShapeMismatchError(
                    f"directions has shape {tuple(basis.shape)}, the model has {self.space.numel} "
                    "parameters; give a (k, n) array with n that number, or dicts keyed like "
                    "model.named_parameters()."
                )
            basis = basis.to(self.device, self.dtype).contiguous()
            rows = list(basis)
        elif isinstance(directions, (Mapping, torch.Tensor, np.ndarray)):
            raise ConfigurationError(
                "evaluate: directions must be a sequence of k directions (a list of dicts), "
                "not a single direction; wrap it in a list: directions=[d]."
            )
        else:
            basis, rows = None, list(directions)
        if not rows:
            raise ConfigurationError("evaluate: directions is empty; give at least one direction.")
        parts = []
        for n, d in enumerate(rows):
            if isinstance(d, Mapping):
                self.space.check(d, what=f"directions[{n}]")
                parts.append([d[s.name].detach().to(self.device, self.dtype).reshape(s.shape) for s in self.space.specs])
                continue
            t = torch.as_tensor(d)
            if t.dim() != 1 or t.numel() != self.space.numel:
                raise ShapeMismatchError(
                    f"directions[{n}] has shape {tuple(t.shape)}, the model has "
                    f"{self.space.numel} parameters; give a flat vector of that length or a "
                    "dict keyed like model.named_parameters()."
                )
            t = t.detach().to(self.device, self.dtype).contiguous()
            parts.append(self._views(t))
        if not all(_all_finite(t) for row in parts for t in row):
            raise ConfigurationError("evaluate: directions contain NaN or inf values.")
        # a direction that is the model's own parameters (θ0 as a path's control point) would
        # change as the loop writes each point into the model: those are copied
        live = {p.untyped_storage().data_ptr() for p in self.root.parameters()}
        if basis is not None and basis.untyped_storage().data_ptr() in live:
            basis = basis.clone()
            return basis, self._row_views(basis)
        parts = [[t.clone() if t.untyped_storage().data_ptr() in live else t for t in row] for row in parts]
        return basis, parts

    @property
    def basis(self) -> torch.Tensor:
        """The directions as one ``(k, n)`` tensor; built on first use (vmap, batched) when they
        came as k directions, which then takes k·n more numbers of memory."""
        if self._basis is None:
            self._basis = self._stacked_parts()
            self._parts = self._row_views(self._basis)
        return self._basis

    def _stacked_parts(self) -> torch.Tensor:
        return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in self._parts])

    def _row_views(self, basis: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row of ``basis`` ``(k, n)``, its views shaped like each parameter."""
        return [self._views(row) for row in basis]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the flat vector ``flat`` shaped like each parameter."""
        return [flat[s.offset : s.stop].view(s.shape) for s in self.space.specs]

    def _choose(self, requested: str) -> tuple[str, str]:
        if self.model_mode == "train":
            train_only = [type(m).__name__ for m in self.root.modules() if isinstance(m, BN_MODULES)]
        elif self.model_mode == "as_is":
            train_only = [type(m).__name__ for m in self.root.modules() if isinstance(m, _TRAIN_ONLY) and m.training]
            dropout = [
                type(m).__name__ for m in self.root.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
            ]
            if dropout:
                warnings.warn(
                    f"evaluate: model_mode='as_is' with {sorted(set(dropout))} in train mode: "
                    "dropout is active, so every value is random (a different mask at each point "
                    "and batch); use model_mode='train' for batch statistics with dropout off.",
                    LandscapesWarning, stacklevel=3,
                )
        else:
            train_only = []
        cannot = None
        if self.model_mode == "recompute_bn" and not self.dataset_metrics:
            raise ConfigurationError(
                "evaluate: model_mode='recompute_bn' re-estimates BatchNorm statistics from "
                "the data of a dataset metric (Loss, Accuracy...); add one, or use "
                "model_mode='eval'."
            )
        if self.custom_metrics:
            cannot = f"custom metrics {[type(m).__name__ for m in self.custom_metrics]} follow the model-wrapper protocol"
        elif not self.functional:
            cannot = f"{type(self.wrapper).__name__} runs its own forward_fn"
        elif train_only:
            cannot = f"{sorted(set(train_only))} in train mode cannot be batched"
        if cannot:
            if requested in ("vmap", "batched") or (requested == "auto" and train_only):
                warnings.warn(
                    f"evaluate: using the per-point loop because {cannot}.", FallbackWarning, stacklevel=3
                )
            return "loop", cannot
        if requested == "loop":
            return "loop", "requested"
        if self.model_mode == "recompute_bn" and requested == "batched":
            warnings.warn(
                "evaluate: strategy='batched' keeps θ0's BatchNorm statistics and cannot "
                "re-estimate them at each point (model_mode='recompute_bn'); using 'vmap'.",
                FallbackWarning, stacklevel=3,
            )
            return "vmap", "requested batched: recompute_bn re-estimates statistics under vmap"
        if requested in ("auto", "batched") and self.model_mode != "recompute_bn":
            plan = batched.sequential_plan(self.root)
            if requested == "auto" and plan is not None and any(isinstance(la.module, nn.Conv2d) for la in plan.layers):
                # measured on W-CNN (docs/benchmarks.md): on a quiet CPU the loop is about 10 %
                # faster than the batched CNN plan; on CUDA vmap stays the unmeasured default
                if self.device.type == "cuda":
                    return "vmap", "CUDA: batched tiles with vmap"
                return "loop", "CPU: the per-point loop beat the batched CNN plan on W-CNN (see docs/benchmarks.md)"
            why = "the model is not one" if plan is None else self._verify(plan)
            if why is None:
                return "batched", "plain Sequential MLP or CNN: hand-batched tiles"
            if requested == "batched":
                warnings.warn(
                    "evaluate: strategy='batched' needs a plain nn.Sequential of Linear, Conv2d, "
                    "BatchNorm1d/2d, pooling, Flatten, Dropout and elementwise activations, called on a tensor "
                    f"batch and returning a tensor ({why}); using 'vmap'.",
                    FallbackWarning, stacklevel=3,
                )
                return "vmap", f"requested batched: {why}"
        if requested == "vmap":
            return "vmap", "requested"
        if self.device.type == "cuda":
            return "vmap", "CUDA: batched tiles with vmap"
        return "loop", "CPU: a per-point loop beats vmap here (see docs/benchmarks.md)"

    def _verify(self, plan: batched.SequentialPlan) -> str | None:
        """Check the batched plan against the model's own forward at θ0 on a little data:
        None when it agrees, else why not."""
        batch = self._probe_batch()
        if batch is None:
            return "no data to check it on"
        if not isinstance(batch[0], torch.Tensor):
            return f"the batch is a {type(batch[0]).__name__}"
        if self.wrapper.forward_adapter.how not in ("auto", "call"):
            return f"forward={self.wrapper.forward_adapter.describe()!r}"
        outputs = [r.describe() for readers, _ in self._readers for r in readers if not r.plain]
        if outputs:
            return f"metrics read output={outputs[0]!r}"
        x = batch[0][:8].clone()  # a model may work in place on its input
        self.plan = plan
        self._prepare_first()
        with self._model_state(), torch.no_grad():
            try:
                zero = torch.zeros(2, self.k, device=self.device, dtype=self.dtype)
                got = [self._batched_forward(x, zero, each) for each in (False, True)]
                want = self.root(x)
            except Exception as err:  # noqa: BLE001 - any failure means: not this path
                self.plan, self._first = None, None
                return f"its batched forward failed: {type(err).__name__}"
        if not isinstance(want, torch.Tensor):
            self.plan, self._first = None, None
            return f"the model returns a {type(want).__name__}"
        if any(g.shape[1:] != want.shape or not torch.allclose(g, want.expand_as(g), rtol=1e-4, atol=1e-5) for g in got):
            self.plan, self._first = None, None
            return "its forward does more than run its Sequential"
        return None

    def _prepare_first(self) -> None:
        """The first Linear layer's origin and basis rows for the shortcut (when its input is
        the data itself), and the smaller space of the parameters the plan reads per point."""
        self._first = None
        for layer in self.plan.layers:
            mod = layer.module
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                break  # the first layer's input then depends on the point: no shortcut
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                if mod.bias is not None and getattr(mod, "groups", 1) == 1:
                    self._first = self._first_rows(layer.prefix)
                break
        skip = set(self._first["names"]) if self._first is not None else set()
        self._plan_space = self.space.subset(n for n in self.space.names if n not in skip)
        self._plan_origin = self.space.select(self.origin, self._plan_space)
        self._plan_basis = self.space.select(self.basis, self._plan_space)

    def _first_rows(self, prefix: str) -> dict[str, Any]:
        spec = {s.name: s for s in self.space.specs}
        ws, bs = spec[prefix + "weight"], spec[prefix + "bias"]
        rows = torch.cat([self.origin.unsqueeze(0), self.basis])  # (k+1, n)
        return {
            "weight": rows[:, ws.offset : ws.stop].reshape(-1, *ws.shape[1:]).contiguous(),
            "bias": rows[:, bs.offset : bs.stop].contiguous(),
            "names": (ws.name, bs.name),
        }

    def plan_compile(self, points: int) -> compiled.CompileDecision:
        """Decide whether the loop's forwards run compiled for a grid of ``points`` points
        (see ``compile``); the decision is in :meth:`describe`. Warns when ``compile="on"``
        cannot be honoured."""
        decision = self._decide_compile(points)
        if self.compile_mode == "on" and not decision.on:
            warnings.warn(f"evaluate: compile='on' but {decision.reason}.", FallbackWarning, stacklevel=2)
        self.compiled = decision
        return decision

    def _decide_compile(self, points: int) -> compiled.CompileDecision:
        self._compiled_forward = None
        if self.compile_mode == "off":
            return compiled.CompileDecision(False, "not asked (compile='off')")
        why = None
        if self.strategy != "loop":
            why = f"the {self.strategy} strategy runs its own batched forwards"
        elif self.custom_metrics or not self.functional:
            why = "custom metrics or a wrapper's forward_fn call the model themselves"
        elif self.model_mode == "recompute_bn":
            why = "recompute_bn re-estimates statistics in train mode at each point"
        probe = self._probe_batch() if why is None else None
        if why is None and probe is None:
            why = "no dataset metric gives a batch to compile on"
        if why is not None:
            return compiled.CompileDecision(False, f"not for this evaluation: {why}")
        x = probe[0]
        module = BoundForward(self.root, self.wrapper.forward_adapter)
        with self._model_state(writes=False), torch.inference_mode(), self._tf32(), self._autocast():  # as the loop runs
            if self.compile_mode == "auto":
                batches = sum(_batch_count(group[0].data) for group in self._groups)
                estimate = compiled.eager_seconds(lambda: module(x)) * batches * points
                if estimate < compiled.COMPILE_AFTER_SECONDS:
                    return compiled.CompileDecision(False, (
                        f"the eager forwards are estimated at {estimate:.0f} s, under the "
                        f"{compiled.COMPILE_AFTER_SECONDS:.0f} s a compile must save to pay off"))
            fn, what = compiled.compile_checked(module, x, module, compiled.TOLERANCE[self.precision])
        self._compiled_forward = fn
        return compiled.CompileDecision(fn is not None, what)

    def _probe_batch(self) -> tuple[Any, Any] | None:
        for group in self._groups:
            for x, y in self._batches(group):
                return x, y
        return None

    def _tile_points(self, memory_budget: int | None, max_batch_points: int | None) -> tuple[int, int]:
        """Points per tile (the unit of work and of progress) and per forward pass within it."""
        if memory_budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                memory_budget = free // 2
            else:
                memory_budget = CPU_MEMORY_BUDGET
        self.memory_budget = int(memory_budget)
        params = self.space.numel * self.origin.element_size() * 2  # a point's parameters (+ a temporary)
        activations = 3 * self._activation_bytes() + self._statistics_bytes() if self.strategy != "loop" else 0
        cap = MAX_TILE_POINTS[self.strategy] if max_batch_points is None else min(max_batch_points, MAX_TILE_POINTS[self.strategy])
        if self.strategy == "loop":
            return _fit(memory_budget, params, cap), 1
        if self.strategy == "vmap":
            points = _fit(memory_budget, params + activations, cap)
            return points, points
        # batched: the tile holds every point's parameters; a pass holds its points' activations
        passes = _fit(memory_budget // 2, activations, cap)
        if self.device.type == "cpu" and self._convolves():
            # a pass holds about one measured activation set per point (ReLUs in place, no
            # Flatten copy); grouped convolutions gain up to about 16 points (W-CNN)
            passes = min(_fit(memory_budget // 2, self._activation_bytes(), cap), CPU_BATCHED_CONV_POINTS)
        elif self.device.type == "cpu":
            if self._activation_bytes() > CPU_BATCHED_MAX_POINT_BYTES:
                passes = 1
            passes = min(passes, max(1, CPU_BATCHED_TILE_BYTES // max(self._activation_bytes(), 1)), CPU_BATCHED_MAX_POINTS)
        passes = min(passes, _fit(memory_budget, params + activations, cap))  # a pass's (m, n) parameters too
        points = max(passes, _fit(memory_budget - passes * activations, params, cap))
        return points, passes

    def _convolves(self) -> bool:
        """Whether the batched plan has convolutions."""
        return self.plan is not None and any(isinstance(layer.module, nn.Conv2d) for layer in self.plan.layers)

    @property
    def bytes_per_point(self) -> int:
        """Memory one grid point needs within a tile: its parameters (and a temporary), plus
        its activations where a pass holds several points (not on the loop), and with
        ``recompute_bn`` under vmap its own BatchNorm statistics and train-mode activations."""
        params = self.space.numel * self.origin.element_size() * 2
        return params + (3 * self._activation_bytes() + self._statistics_bytes() if self.strategy != "loop" else 0)

    def _statistics_bytes(self) -> int:
        """With ``recompute_bn`` under vmap, what a point adds: its BatchNorm statistics, and
        one more copy of its activations for the train-mode passes (vmap's batch norm moves
        the points into the channels of a copy of its input to take batch statistics)."""
        if self.model_mode != "recompute_bn" or self.strategy != "vmap":
            return 0
        stats = sum(2 * m.running_mean.numel() * m.running_mean.element_size() for m in batchnorm_modules(self.root))
        return stats + self._activation_bytes()

    def _activation_bytes(self) -> int:
        """Bytes of every leaf module's output for one point on the first batch (measured once)."""
        if getattr(self, "_act_bytes", None) is None:
            self._act_bytes = self._measure_activations()
        return self._act_bytes

    def hold_memory(self) -> contextlib.AbstractContextManager[None]:
        """On a CPU, keep freed activations for reuse while evaluating (see
        :mod:`landscapes.allocator`); hold it around many tiles to hold once."""
        if not self._holds_memory():
            return contextlib.nullcontext()
        self._activation_bytes()
        return allocator.hold_freed_memory(self.memory_budget, self._largest_bytes)

    def _holds_memory(self) -> bool:
        return self.device.type == "cpu" and allocator.holds_freed_memory()

    def _output_bytes(self) -> int:
        """Bytes of the model's output for one point on the first batch (measured once)."""
        self._activation_bytes()
        return self._out_bytes

    def _measure_activations(self) -> int:
        self._out_bytes = self._largest_bytes = 0
        batch = self._probe_batch()
        if batch is None:
            return 0
        total = [0]

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                size = out.numel() * out.element_size()
                total[0] += size
                self._largest_bytes = max(self._largest_bytes, size)

        leaves = [m for m in self.root.modules() if not any(True for _ in m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with self._model_state(), torch.no_grad():
                out = self.wrapper.forward(map_tensors(torch.clone, batch[0]))
            self._out_bytes = tensor_bytes(out)
        finally:
            for h in handles:
                h.remove()
        return total[0]

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_points(self, coords: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Metric values at the points ``coords`` ``(m, k)``: name → array ``(m,)`` (float64)."""
        c = torch.as_tensor(np.asarray(coords, dtype=np.float64)).to(self.device, self.dtype)
        if c.dim() != 2 or c.shape[1] != self.k:
            raise ShapeMismatchError(
                f"evaluate_points: coords have shape {tuple(c.shape)}, expected (m, {self.k})."
            )
        if self.strategy == "vmap":
            try:
                return self._run(c)
            except LandscapesError:
                raise  # our own message (an adapter, a metric): the loop would say the same
            except Exception as err:  # noqa: BLE001 - fall back, then re-raise if the loop fails too
                warnings.warn(
                    f"evaluate: vmap failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                    "using the per-point loop.", FallbackWarning, stacklevel=2,
                )
                self.strategy, self.reason = "loop", f"vmap failed: {type(err).__name__}"
        return self._run(c)

    def evaluate_tile(self, grid: Grid, tile: Tile) -> dict[str, np.ndarray]:
        """Metric values on one block of ``grid``: name → array shaped like ``tile``."""
        values = self.evaluate_points(grid.coordinates(tile.slices))
        return {n: v.reshape(tile.shape) for n, v in values.items()}

    def _run(self, c: torch.Tensor) -> dict[str, np.ndarray]:
        writes = self.strategy == "loop" or bool(self.custom_metrics)  # batched and vmap only read it
        with self.hold_memory(), self._model_state(writes), torch.no_grad(), self._tf32():
            if self.model_mode == "recompute_bn":
                with self._autocast():  # its forwards and the statistics' passes alike
                    results = self._run_recalibrated(c)
            else:
                results = self._values(c, self._forward)
        return {name: results[id(metric)] for name, metric in zip(self.metric_names, self.metrics, strict=True)}

    def _values(self, c: torch.Tensor, forward: Callable[..., Iterator[tuple[int, tuple[torch.Tensor, ...]]]], here: bool = False) -> dict[int, np.ndarray]:
        """Every metric at the points ``c``: dataset metrics from the outputs ``forward`` yields,
        custom metrics on the model set to each point (``here``: the model is at the point)."""
        m = c.shape[0]
        results: dict[int, np.ndarray] = {}
        point_outer = self.strategy == "loop" and forward == self._forward
        for group, (readers, which) in zip(self._groups, self._readers, strict=True):
            totals = torch.zeros(len(group), m, dtype=torch.float64)
            weights = [0.0] * len(group)
            seen = 0
            for block in self._blocks(group, LOOP_BLOCK_BYTES if point_outer else 0):
                seen += len(block)
                if point_outer:  # each point's θ written once per block of batches, not once per batch
                    outputs: Iterator[tuple[int, Any, tuple[torch.Tensor, ...]]] = self._loop_block(block, c, readers)
                else:
                    outputs = ((start, block[0][1], outs) for start, outs in forward(block[0][0], c, readers))
                for start, y, outs in outputs:
                    for i, metric in enumerate(group):
                        out = _widened(outs[which[i]])  # bf16 outputs: the loss in float32
                        totals[i, start : start + out.shape[0]] += metric._update(out, y).cpu()
                for _x, y in block:
                    for i, metric in enumerate(group):
                        weights[i] += metric._weight(y)
            for i, metric in enumerate(group):
                if seen == 0:
                    raise ConfigurationError(
                        f"evaluate: the data of metric {metric.name!r} yielded no batches; "
                        "give a non-empty dataset."
                    )
                results[id(metric)] = metric._compute(totals[i], weights[i]).numpy()
        if self.custom_metrics:
            values = {id(metric): np.empty(m, dtype=np.float64) for metric in self.custom_metrics}
            set_point = (lambda p: None) if here else self._setter(c)
            for p in range(m):
                set_point(p)
                for metric in self.custom_metrics:
                    with self._autocast():
                        value = metric(self.wrapper)
                    values[id(metric)][p] = _scalar(value, metric, p)
            results.update(values)
        return results

    def _run_recalibrated(self, c: torch.Tensor) -> dict[int, np.ndarray]:
        """``model_mode="recompute_bn"``: at each point, BatchNorm statistics re-estimated from
        the same batches, then every metric in eval mode with them."""
        if self.strategy == "vmap":
            return self._run_recalibrated_vmap(c)
        parts: list[dict[int, np.ndarray]] = []
        inputs = self._recalibration_inputs()
        for start in range(0, c.shape[0], CHUNK_POINTS):
            cs = c[start : start + CHUNK_POINTS]
            set_point = self._setter(cs)
            for p in range(cs.shape[0]):
                set_point(p)
                recalibrate_bn(self.root, inputs, self.wrapper.forward)
                parts.append(self._values(cs[p : p + 1], self._here, here=True))
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _run_recalibrated_vmap(self, c: torch.Tensor) -> dict[int, np.ndarray]:
        """``recompute_bn`` for a chunk of points at once: fresh statistics per point, the
        statistic passes under vmap with the BatchNorm modules in train mode and
        ``momentum=None`` (each point's buffers accumulate the plain average, as
        :func:`recalibrate_bn` does in the loop), then every metric in eval mode with them.
        The model's own buffers are never handed to vmap, so they are left as they were."""
        step = self._chunk_points()
        parts = [self._recalibrated_chunk(c[start : start + step]) for start in range(0, c.shape[0], step)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _recalibrated_chunk(self, c: torch.Tensor) -> dict[int, np.ndarray]:
        thetas = self._points(c)
        stats = point_statistics(self.root, c.shape[0])
        with estimating_statistics(self.root):
            for x in self._recalibration_inputs():
                self._vmap_forward(x, thetas, (), stats)

        def forward(x: Any, _c: torch.Tensor, readers: Sequence[Output]) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
            yield 0, self._vmap_forward(x, thetas, readers, stats)

        return self._values(c, forward)

    def _here(self, x: Any, c: torch.Tensor, readers: Sequence[Output]) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """The outputs of the model as it is (one point)."""
        raw = self.wrapper.forward(x)
        yield 0, tuple(r(raw).unsqueeze(0) for r in readers)

    def _recalibration_inputs(self) -> list[Any]:
        """The first ``bn_batches`` batches' inputs of the first metric's data, on the device,
        read once (a shuffling DataLoader would give other batches on every pass)."""
        if self._bn_inputs is None:
            inputs = []
            for x, _ in self._batches(self._groups[0]):
                inputs.append(x)
                if len(inputs) == self.bn_batches:
                    break
            self._bn_inputs = inputs
        return self._bn_inputs

    def _forward(self, x: Any, c: torch.Tensor, readers: Sequence[Output]) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """Model outputs of the batched and vmap strategies for every point of the tile on batch
        ``x``, as (first index, one ``(m', N, ...)`` tensor per reader); the loop goes point by
        point over blocks of batches instead (:meth:`_loop_block`).

        The tile goes in chunks, each with its points' parameters ``origin + c·basis`` computed
        fresh, so they stay in cache however large the tile is.
        """
        step = self._chunk_points()
        for start in range(0, c.shape[0], step):
            cs = c[start : start + step]
            if self.strategy == "batched":  # only with plain readers: the output as it is
                with self._autocast():  # here, not inside: _verify checks the plan in fp32
                    out = self._batched_forward(x, cs, each=self.pass_points == 1 and len(cs) > 1)
                yield start, (out,) * len(readers)
            else:
                yield start, self._vmap_forward(x, self._points(cs), readers)

    def _chunk_points(self) -> int:
        """Points computed together: a pass, or one-point passes whose outputs go to the metrics
        together."""
        if self.pass_points > 1 or (self.strategy == "batched" and self._convolves()):
            return self.pass_points  # a CNN's one-point passes: its grouped form, which was faster
        if self.strategy == "batched":  # one-point passes from one (m, n) matrix: within the budget
            params = self.space.numel * self.origin.element_size() * 2
            return min(_fit(CPU_BATCHED_TILE_BYTES, self._output_bytes(), CHUNK_POINTS), _fit(self.memory_budget, params, CHUNK_POINTS))
        return CHUNK_POINTS

    def _vmap_forward(
        self, x: Any, thetas: torch.Tensor, readers: Sequence[Output],
        statistics: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Outputs for the points ``thetas`` ``(m, n)``; ``statistics`` (shared, per point; see
        :func:`~landscapes.bn.point_statistics`) replace the model's BatchNorm buffers."""
        params = self.space.unflatten(thetas)
        shared, per_point = statistics if statistics is not None else ({}, {})
        buffers = {n: b for n, b in {**dict(self.root.named_buffers()), **shared}.items() if n not in per_point}
        adapter = self.wrapper.forward_adapter
        if isinstance(x, torch.Tensor) and adapter.how in ("auto", "call"):
            module, prefix = self.root, ""
        else:  # the adapter calls the model inside functional_call
            module, prefix = BoundForward(self.root, adapter), "model."
            buffers = {prefix + n: b for n, b in buffers.items()}

        def one(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            if prefix:
                p = {prefix + n: t for n, t in p.items()}
            raw = torch.func.functional_call(module, (p, buffers), (x,))
            return tuple(r(raw) for r in readers)

        with self._autocast():
            return torch.func.vmap(one, randomness="error")({**params, **per_point})

    def _blocks(self, group: list[DatasetMetric], budget: int) -> Iterator[list[tuple[Any, torch.Tensor]]]:
        """The group's batches in consecutive blocks of at most ``budget`` bytes (at least one
        batch each; ``budget=0``: one batch per block)."""
        block: list[tuple[Any, torch.Tensor]] = []
        size = 0
        for x, y in self._batches(group):
            nbytes = tensor_bytes(x) + tensor_bytes(y)
            if block and size + nbytes > budget:
                yield block
                block, size = [], 0
            block.append((x, y))
            size += nbytes
        if block:
            yield block

    def _loop_block(self, block: list[tuple[Any, torch.Tensor]], c: torch.Tensor, readers: Sequence[Output]) -> Iterator[tuple[int, Any, tuple[torch.Tensor, ...]]]:
        """``(point, its batch's target, outputs)``, point after point, each point's batches in turn."""
        set_point = self._setter(c)
        for p in range(c.shape[0]):
            set_point(p)
            for x, y in block:
                with torch.inference_mode(), self._autocast():  # no version counters, no autograd records
                    raw = self.wrapper.forward(x) if self._compiled_forward is None else self._compiled_forward(x)
                    outs = tuple(r(raw).unsqueeze(0) for r in readers)
                yield p, y, outs

    def _batched_forward(self, x: torch.Tensor, c: torch.Tensor, each: bool) -> torch.Tensor:
        """Outputs for the points ``c`` in one pass, or (``each``) one point after another."""
        # only the parameters the plan reads: not the first layer's when the shortcut covers it
        params = self._plan_space.unflatten(torch.addmm(self._plan_origin.unsqueeze(0), c, self._plan_basis))
        buffers = dict(self.root.named_buffers())
        # one-batch data: the first layer's products are the same for every tile
        cache = self._first_cache.setdefault(id(x), {}) if self._is_cached(x) else None
        run = self.plan.forward_each if each else self.plan.forward
        return run(x, c, params, self._first, buffers, cache)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast around a forward with ``precision="bf16"``, else nothing.

        Without autocast's weight cache: it keeps the bf16 copy of each parameter for as long
        as the autocast region lasts, so a region spanning several points (the recompute_bn
        path, a custom metric's own loop) would compute them all with the first one's weights.
        """
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    @contextlib.contextmanager
    def _tf32(self) -> Iterator[None]:
        """On CUDA, TF32 matmuls and convolutions on with ``precision="tf32"`` and off otherwise
        during the evaluation; the global flags restored afterwards."""
        if self.device.type != "cuda":
            yield
            return
        flags = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = [f.allow_tf32 for f in flags]
        for f in flags:
            f.allow_tf32 = self.precision == "tf32"
        try:
            yield
        finally:
            for f, old in zip(flags, saved, strict=True):
                f.allow_tf32 = old

    def _is_cached(self, x: Any) -> bool:
        return any(batch[0] is x for batch in self._cached_batches.values())

    def _points(self, c: torch.Tensor) -> torch.Tensor:
        """θ for every point, ``(m, n)``: origin + c·basis, from scratch."""
        return torch.addmm(self.origin.unsqueeze(0), c, self.basis)

    def _setter(self, c: torch.Tensor) -> Callable[[int], None]:
        """A function writing point ``p`` of ``c`` ``(m, k)`` into the model's parameters in
        place, from scratch: per parameter, ``torch.add(origin, d₁, alpha=c₁, out=param)``,
        then ``param.add_(dᵢ, alpha=cᵢ)`` for the other directions.

        No ``(m, n)`` matrix of the chunk's points is formed, and no temporary: on ResNet-18
        (11 M parameters) writing that matrix and reading it back cost as much as the
        convolutions. On a quiet machine this way made the whole loop 1.45-1.5x faster than
        the matrix on ResNet-18, against 1.4x for foreach adds and 1.2x for an ``addmv`` into
        a flat buffer (``python -m benchmarks.theta_build``; docs/benchmarks.md).
        """
        named = dict(self.root.named_parameters())
        params = [named[s.name] for s in self.space.specs]
        origin = self._views(self.origin)
        basis = self._parts
        coords = c.tolist()  # one transfer per chunk; the scalars are the adds' alphas

        def set_point(p: int) -> None:
            (a, first), *rest = zip(coords[p], basis, strict=True)
            for i, (param, o, d) in enumerate(zip(params, origin, first, strict=True)):
                torch.add(o, d, alpha=a, out=param)
                for b, rows in rest:
                    param.add_(rows[i], alpha=b)

        return set_point

    def _batches(self, group: list[DatasetMetric]) -> Iterator[tuple[Any, torch.Tensor]]:
        data = group[0].data
        if data.single:
            key = data.key
            if key not in self._cached_batches:
                x, y = next(iter(data))
                self._cached_batches[key] = (self._inputs(x, data.target_key), _to(y, self.device))
            yield self._cached_batches[key]
            return
        for x, y in data:
            yield self._inputs(x, data.target_key), _to(y, self.device)

    def _inputs(self, x: Any, target_key: str) -> Any:
        """A batch's inputs on the device; a mapping without its targets when the model's
        forward does not take them."""
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        if isinstance(x, Mapping) and target_key in x and not self._takes(target_key):
            x = without_key(x, target_key)
        return _to(x, self.device)

    def _takes(self, key: str) -> bool:
        if key not in self._takes_key:
            adapter = getattr(self.wrapper, "forward_adapter", None)
            self._takes_key[key] = adapter is None or adapter.takes(self.root, key)
        return self._takes_key[key]

    @contextlib.contextmanager
    def _model_state(self, writes: bool = True) -> Iterator[None]:
        """Set the evaluation mode; restore the modes afterwards, and parameters and buffers
        too unless the caller promises not to write them (``writes=False``)."""
        modules = list(self.root.modules())
        modes = [m.training for m in modules]
        params = [p for p in self.root.parameters()] if writes else []
        saved = self._saved_parameters(params)
        buffers = [b for b in self.root.buffers()] if writes else []
        saved_buffers = [b.detach().clone() for b in buffers]
        try:
            if self.model_mode != "as_is":
                self.root.train(False)
            if self.model_mode == "train":  # batch statistics; dropout stays off
                for mod in modules:
                    if isinstance(mod, BN_MODULES):
                        mod.train(True)
            yield
        finally:
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, saved)
                if buffers:
                    torch._foreach_copy_(buffers, saved_buffers)
            for mod, mode in zip(modules, modes, strict=True):
                mod.training = mode

    def _saved_parameters(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What restores ``params`` afterwards: views of the origin when the origin is the model's
        own parameters and they still hold it (no copy of the model), else a clone of each."""
        if self._origin_is_model and params:
            views = self._views(self.origin)
            if len(views) == len(params) and all(torch.equal(p, v) for p, v in zip(params, views, strict=True)):
                return views
        return [p.detach().clone() for p in params]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cached_batches"] = {}
        state["_first_cache"] = {}
        state["_bn_inputs"] = None
        state["_compiled_forward"] = None  # compiled again where it runs (see __setstate__)
        if self._basis is None:  # one flat array: views of the caller's tensors would each carry their storage
            state["_basis"] = self._stacked_parts()
        state["_parts"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._parts = self._row_views(self._basis)
        if self.compiled.on:  # the same graph the parent checked, built again in this process
            self._compiled_forward = torch.compile(BoundForward(self.root, self.wrapper.forward_adapter), dynamic=False)

    def describe(self) -> dict[str, Any]:
        """What was chosen and why, for provenance."""
        return {
            "strategy": self.strategy,
            "strategy_reason": self.reason,
            "tile_points": self.tile_points,
            "pass_points": self.pass_points,
            "memory_budget": self.memory_budget,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "model_mode": self.model_mode,
            "precision": self.precision,
            "compile": str(self.compiled),
            **({"bn_batches": self.bn_batches} if self.model_mode == "recompute_bn" else {}),
            "forward": self.wrapper.forward_adapter.describe() if self.functional else type(self.wrapper).__name__,
            "output": self.output_adapter.describe(),
            "cpu_allocator": "holds freed memory" if self._holds_memory() else "system",
            "num_parameters": self.space.numel,
            "num_directions": self.k,
            "metrics": list(self.metric_names),
        }


def evaluate(
    model: nn.Module | ModelWrapper,
    metric: Metric | Sequence[Metric],
    directions: Sequence[DirectionLike] | torch.Tensor | np.ndarray,
    axes: Sequence[np.ndarray | Sequence[float]],
    *,
    device: str | torch.device | None = None,
    strategy: Strategy = "auto",
    max_batch_points: int | None = None,
    memory_budget: int | None = None,
    model_mode: ModelMode = "eval",
    dims: Sequence[str] | None = None,
    progress: bool = False,
    origin: Mapping[str, torch.Tensor] | None = None,
    forward: ForwardSpec = "auto",
    output: OutputSpec = "auto",
    bn_batches: int = BN_BATCHES,
    precision: Precision = "fp32",
    compile: compiled.CompileMode = "auto",  # noqa: A002 - the option is torch.compile
) -> Landscape:
    """Evaluate metrics on the grid ``θ0 + Σ axes[i][jᵢ]·directions[i]``.

    Args:
        model: the model at θ0 (or a :class:`ModelWrapper`); left exactly as it was.
        metric: a metric (``Loss``, ``Accuracy``, a custom ``Metric``), a pipeline or a list.
        directions: k directions keyed like ``model.named_parameters()`` (or flat vectors).
        axes: k 1-D coordinate arrays, any lengths and ranges; ``values[i, j]`` is at
            ``(axes[0][i], axes[1][j])``.
        device: where to evaluate; default the model's device.
        strategy: ``"auto"``, ``"batched"``, ``"vmap"`` or ``"loop"``.
        max_batch_points: upper bound on grid points per tile.
        memory_budget: bytes per tile; default 1 GiB on a CPU, half the free memory on CUDA.
        model_mode: ``"eval"`` (default), ``"train"``, ``"recompute_bn"`` or ``"as_is"``
            (see :class:`Evaluator`).
        dims: axis names; default ``x``, ``y``, ``z``.
        progress: show a progress bar.
        origin: the point at coordinate 0 (default θ0, the model's parameters).
        forward: how a batch reaches the model (``"auto"``, ``"call"``, ``"star"``,
            ``"kwargs"`` or a callable ``forward(model, batch)``).
        output: what of the output the metrics read (``"auto"``, ``"logits"``, ``"loss"``, an
            index or a callable).
        bn_batches: batches re-estimating BatchNorm statistics with ``"recompute_bn"``.
        precision: ``"fp32"`` (default), ``"tf32"`` (CUDA) or ``"bf16"`` (autocast); see
            :class:`Evaluator`.
        compile: ``"auto"`` (default: ``torch.compile`` the loop's forwards when they are
            estimated to take over a minute eagerly), ``"on"`` or ``"off"``; see
            :class:`Evaluator`.

    Returns:
        A :class:`Landscape` with one array per metric, shaped like the grid.

    >>> import landscapes as L
    >>> model = torch.nn.Linear(2, 1)
    >>> loss = L.Loss(torch.nn.MSELoss(), torch.ones(4, 2), torch.zeros(4, 1))
    >>> d = L.random_direction(model, seed=0)
    >>> L.evaluate(model, loss, [d], [[-1.0, 0.0, 1.0]]).values["loss"].shape
    (3,)
    """
    grid = Grid(axes)
    started = time.perf_counter()
    evaluator = Evaluator(
        model, metric, directions, origin=origin, device=device, strategy=strategy,
        model_mode=model_mode, memory_budget=memory_budget, max_batch_points=max_batch_points,
        forward=forward, output=output, bn_batches=bn_batches, precision=precision, compile=compile,
    )
    if evaluator.k != grid.ndim:
        raise ShapeMismatchError(
            f"evaluate: {evaluator.k} direction(s) but {grid.ndim} axis/axes; give one coordinate "
            "array per direction."
        )
    evaluator.plan_compile(grid.size)
    tile_shape = tile_shape_for(grid.shape, evaluator.tile_points)
    values = {name: np.full(grid.shape, np.nan) for name in evaluator.metric_names}
    tiles = grid.tiles(tile_shape)
    bar = _progress(grid.size, progress)
    try:
        with evaluator.hold_memory():
            for tile in tiles:
                try:
                    out = evaluator.evaluate_tile(grid, tile)
                except (ConfigurationError, ShapeMismatchError):
                    raise
                except Exception as err:
                    raise EvaluationError(
                        f"evaluate: tile {tile.index} (grid indices {[(s.start, s.stop) for s in tile.slices]}) "
                        f"failed: {type(err).__name__}: {err}"
                    ) from err
                for name, block in out.items():
                    values[name][tile.slices] = block
                bar(tile.size)
    finally:
        bar(None)
    meta = evaluator.describe()
    meta.update(tile_shape=list(tile_shape), seconds=time.perf_counter() - started)
    return Landscape(values=values, axes=grid.axes, dims=dims, metadata=meta)


def evaluate_tile(evaluator: Evaluator, axes: Sequence[np.ndarray], slices: Sequence[slice]) -> dict[str, np.ndarray]:
    """Evaluate one block of grid indices: the unit of work of the pipeline and of dask.

    Args:
        evaluator: a prepared :class:`Evaluator` (picklable; build it once per worker).
        axes: the grid's coordinate arrays.
        slices: one slice per axis.

    Returns:
        Metric name → values shaped like the block.
    """
    grid = Grid(axes)
    slices = tuple(slice(*s.indices(n)[:2]) for s, n in zip(slices, grid.shape, strict=True))
    return evaluator.evaluate_tile(grid, Tile(index=(), slices=slices))


def _batch_count(data: Any) -> int:
    """Batches a metric's data holds (1 when it cannot tell, e.g. a generator)."""
    if data.single:
        return 1
    try:
        return max(1, len(data.batches))
    except TypeError:
        return 1


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="pt", desc="landscape", smoothing=0.1)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update


def _fit(budget: int, per_point: int, cap: int) -> int:
    """How many points of ``per_point`` bytes fit in ``budget``: at least 1, at most ``cap``."""
    return max(1, min(cap, int(budget // max(per_point, 1))))


def _all_finite(t: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """Whether every entry of ``t`` is finite, a chunk at a time (no temporary the size of ``t``)."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(chunk))


def _widened(out: torch.Tensor) -> torch.Tensor:
    """A half or bfloat16 output as float32, so losses and their sums are not rounded to 8 bits."""
    return out.float() if isinstance(out, torch.Tensor) and out.dtype in (torch.bfloat16, torch.float16) else out


def _group_by_data(metrics: list[DatasetMetric]) -> list[list[DatasetMetric]]:
    groups: dict[tuple[int, int], list[DatasetMetric]] = {}
    for m in metrics:
        groups.setdefault(m.data.key, []).append(m)
    return list(groups.values())


def _scalar(value: Any, metric: Metric, point: int = 0) -> float:
    """The one number a custom metric returned: a Python or numpy number (bool included), or a
    tensor or array of one element."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    if isinstance(value, torch.Tensor):
        numeric = not value.is_complex()
    elif isinstance(value, np.ndarray):
        numeric = value.dtype.kind in "biuf"
    else:
        numeric = isinstance(value, (int, float, np.integer, np.floating, np.bool_))
    name = getattr(metric, "name", None) or type(metric).__name__
    if not numeric:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise MetricValueError(
            f"evaluate: metric {name!r} ({type(metric).__name__}) returned {shown} (a "
            f"{type(value).__name__}) at point {point}; a Metric must return one number: a float, "
            "an int, a numpy number or a 0-d tensor."
        )
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 1:
        raise MetricValueError(
            f"metric {type(metric).__name__} returned an array of shape {arr.shape}; evaluate "
            "stores one number per point. Return a float (e.g. a norm of the array)."
        )
    return float(arr.reshape(()))


def _resolve_device(device: str | torch.device | None, root: nn.Module) -> torch.device:
    if device is None or device == "auto":
        return _device_of(root) if device is None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            f"device={str(device)!r} but no CUDA device is available; use device='cpu' (or 'auto')."
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _copy_wrapper(wrapper: ModelWrapper, copy_fn: Callable[[Any], Any]) -> ModelWrapper:
    if type(wrapper) is SimpleModelWrapper:
        return SimpleModelWrapper(copy_fn(wrapper.modules[0]), forward=wrapper.forward_adapter)
    return copy_fn(wrapper)


def _readers(group: list[DatasetMetric], default: Output) -> tuple[list[Output], list[int]]:
    """The distinct output adapters of ``group`` and, per metric, the index of the one it reads."""
    readers: list[Output] = []
    which = []
    for metric in group:
        reader = metric.output if metric.output is not None else default
        if reader not in readers:
            readers.append(reader)
        which.append(readers.index(reader))
    return readers, which


class BoundForward(nn.Module):
    """``forward(model, batch)`` as a module, so ``functional_call`` can run any adapter."""

    def __init__(self, model: nn.Module, forward: Forward):
        super().__init__()
        self.model = model
        self.adapter = forward

    def forward(self, batch: Any) -> Any:
        return self.adapter(self.model, batch)
