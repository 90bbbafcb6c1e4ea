"""Structured-config schemas of the pipeline; ``register_configs()`` stores them for Hydra.

The top-level :class:`PipelineConfig` is the schema of ``conf/config.yaml`` (its defaults list
starts with ``base_config``), so a wrong type or an unknown key in any group fails when
Hydra composes the config (keys added with Hydra's ``+`` are, by Hydra's design, not checked). Field names equal the library keywords they feed; choices are
``str`` Enums whose values are the library's strings.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from landscapes.errors import ConfigurationError


class Normalization(StrEnum):
    filter = "filter"
    layer = "layer"
    model = "model"
    none = "none"


class Ignore(StrEnum):
    biasbn = "biasbn"
    none = "none"


class DirectionKind(StrEnum):
    random = "random"  # seeded Gaussian, normalized
    checkpoints = "checkpoints"  # towards other checkpoints: θᵢ − θ0
    hessian = "hessian"  # the top Hessian eigenvectors at θ0 (unit vectors, stored as they are)
    pca = "pca"  # principal directions of a training trajectory's displacements from θ0 (or the origin)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(StrEnum):
    auto = "auto"
    loop = "loop"
    vmap = "vmap"
    batched = "batched"


class PlotlyJs(StrEnum):
    embed = "embed"  # each HTML page carries plotly.js (~5 MB): renders in MLflow's artifact viewer and offline
    directory = "directory"  # one plotly.min.js beside the pages: small pages, for browsing the folder itself

    @property
    def include(self) -> bool | str:
        """As plotly's ``include_plotlyjs``: embedded (True) or one file per folder."""
        return True if self is PlotlyJs.embed else "directory"


class ModelMode(StrEnum):
    eval = "eval"  # BatchNorm with θ0's running statistics at every point, dropout off
    train = "train"  # BatchNorm with each batch's own statistics, dropout off
    recompute_bn = "recompute_bn"  # statistics re-estimated at each point from compute.bn_batches batches
    as_is = "as_is"  # the modes the model's modules are in (dropout too)


class Precision(StrEnum):
    fp32 = "fp32"  # full float32 (on CUDA with TF32 off)
    tf32 = "tf32"  # CUDA only: TF32 matmuls and convolutions
    bf16 = "bf16"  # bfloat16 autocast around the forwards (CPU and CUDA); losses summed in float32/64


class CompileMode(StrEnum):
    auto = "auto"  # torch.compile the loop's forwards when they are estimated to take over a minute eagerly
    on = "on"
    off = "off"


class Backend(StrEnum):
    local = "local"
    dask = "dask"


class HvpMethod(StrEnum):
    auto = "auto"  # both tried on the first batch, the faster one kept
    func = "func"  # torch.func: jvp of grad of a functional_call
    double_backward = "double_backward"


class SharpnessNorm(StrEnum):
    l2 = "l2"
    linf = "linf"


class StageName(StrEnum):
    checkpoint = "checkpoint"
    curvature = "curvature"
    connectivity = "connectivity"
    directions = "directions"
    evaluate = "evaluate"
    aggregate = "aggregate"
    report = "report"


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING
    data_dir: str = MISSING
    artifacts_dir: str = MISSING
    demo_dir: str = MISSING


@dataclass
class DataConfig:
    dataset: dict[str, Any] = field(default_factory=dict)  # _target_ returning a torch Dataset
    batch_size: int | None = None  # None: the whole dataset as one batch
    limit: int | None = None  # use the first `limit` samples
    name: str = "data"


@dataclass
class CheckpointConfig:
    path: str | None = None  # file (.pt/.pth/.safetensors/.ckpt) or runs:/… models:/… URI; None: demo
    trust_pickle: bool = False
    strict: bool = True


@dataclass
class DirectionsConfig:
    kind: DirectionKind = DirectionKind.random
    normalization: Normalization = Normalization.filter
    ignore: Ignore = Ignore.biasbn
    seed: int = 0
    towards: list[str] = field(default_factory=list)  # checkpoints for kind=checkpoints
    orthogonalize: bool = False
    trajectory: list[str] = field(default_factory=list)  # kind=pca: a training run's checkpoints (paths, URIs, globs)
    center: bool = False  # kind=pca: remove the displacements' mean first (Li et al. / sklearn)
    # kind=pca: scale each direction so the trajectory's coordinates reach ±1 at most (the grid's range then
    # frames the run whatever its length); false keeps unit directions (coordinates in parameter units)
    scale_to_trajectory: bool = True
    # The shared plane of a sweep: every job's plane goes through this checkpoint (its origin), with the
    # directions made there, so all landscapes of the sweep lie on one plane and can be subtracted.
    origin: str | None = None


@dataclass
class GridConfig:
    dims: int = 2
    steps: Any = 21  # int, or one per axis
    range: Any = field(default_factory=lambda: [-1.0, 1.0])  # [lo, hi], or one pair per axis


@dataclass
class MetricsConfig:
    """What each grid point measures; every metric is one array of the store, named by its key.

    ``loss`` is ``loss_fn(output, target)`` (or, with ``model_loss``, the ``.loss`` the model
    returns itself, as HuggingFace models do given ``labels``); ``accuracy`` and ``perplexity``
    come from the same forward pass. ``ignore_index``, ``shift`` and ``target_key`` are the
    token options of the library's metrics. ``extra`` holds custom metrics by name, each a
    ``_target_`` (a ``landscapes.Metric`` subclass, or a function ``f(model, batch) -> float``)
    with its keyword arguments.
    """

    loss: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})
    accuracy: bool = True
    perplexity: bool = False  # exp of the mean cross-entropy over every counted target (token)
    model_loss: bool = False  # "loss" is the model's own output.loss, not metrics.loss
    ignore_index: int = -100  # targets (tokens) with this value are not counted
    shift: bool = False  # causal language models: the output at t against the target at t + 1
    target_key: str = "labels"  # where a mapping batch keeps its targets
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {_target_: ..., kwargs}


@dataclass
class ComputeConfig:
    device: Device = Device.auto
    strategy: Strategy = Strategy.auto
    model_mode: ModelMode = ModelMode.eval
    bn_batches: int = 10  # batches that re-estimate BatchNorm statistics with model_mode=recompute_bn
    precision: Precision = Precision.fp32  # the forwards' arithmetic: fp32 | tf32 (CUDA) | bf16
    compile: CompileMode = CompileMode.auto  # torch.compile the loop's forwards: auto | on | off
    memory_budget: int | None = None  # bytes per tile
    max_batch_points: int | None = None  # grid points per tile (tile = Zarr chunk)
    backend: Backend = Backend.local
    workers: int = 2
    threads_per_worker: int = 1
    scheduler: str | None = None  # address of an existing dask scheduler, e.g. tcp://host:8786
    connect_timeout: float | None = None  # seconds to reach compute.scheduler (None: $LANDSCAPES_DASK_CONNECT_TIMEOUT, else 10)
    no_workers_timeout: float = 60.0  # seconds a dask cluster may have no workers before the run fails
    progress: bool = True


@dataclass
class AdaptersConfig:
    """How a batch reaches the model and what of its output the metrics read.

    A section of its own, not keys of ``model`` (whose keys all go to the model's constructor,
    and which the checkpoint and directions stages are keyed on) nor of ``compute`` (which says
    how the values are computed, never what they are): the adapters change the values.
    Values are the library's strings, or ``{_target_: my.pkg.fn}`` for a callable
    (``forward(model, batch)``, ``output(model_output) -> tensor``).
    """

    forward: Any = "auto"  # auto | call (model(x)) | star (model(*x)) | kwargs (model(**x)) | {_target_: ...}
    output: Any = "auto"  # auto | logits | loss | an element index such as 0 | {_target_: ...}


@dataclass
class TrackingConfig:
    uri: str = MISSING
    experiment: str = "landscapes"
    run_name: str | None = None
    reuse: bool = True  # reuse finished stage runs with the same inputs
    request_timeout: float = 30.0  # seconds an HTTP tracking server has to answer one call (all retries)


@dataclass
class PlotConfig:
    enabled: bool = True
    log: bool = True  # log scale for the loss
    html: bool = True
    metrics: list[str] = field(default_factory=lambda: ["loss", "accuracy"])
    exports: bool = True  # landscape.nc (NetCDF, xarray) and, for planes, landscape.vts (VTK, ParaView)
    plotlyjs: PlotlyJs = PlotlyJs.embed  # how HTML pages get plotly.js (MLflow's viewer renders only embedded pages)


@dataclass
class SummaryConfig:
    radius: float = 0.1  # sharpness: mean loss increase within this coordinate radius of θ0
    flat_tolerance: float = 0.1  # flat area: fraction of points with loss ≤ (1 + tol)·loss(θ0)


@dataclass
class CurvatureConfig:
    """The curvature stage (``curvature.enabled``) and the Hessian eigenvectors of
    ``directions.kind=hessian``: options of ``landscapes.curvature_summary`` and of the
    average / worst-case sharpness at θ0 (``landscapes.average_sharpness``, ``worst_case_sharpness``)."""

    enabled: bool = False  # run the curvature stage (after checkpoint)
    tol: float = 1e-3  # Lanczos residual tolerance of the extreme eigenvalues (relative to each |λ|)
    max_iter: int = 1000  # Hessian-vector products the extreme eigenvalues may spend
    trace_probes: int = 60  # Hutch++ products for the trace
    spectrum_probes: int = 5  # SLQ probes of the spectral density
    steps: int = 40  # Lanczos steps per SLQ probe
    deflate: int = 20  # extreme eigenpairs the spectral density takes exactly (0: plain SLQ)
    negative_threshold: float = 1e-3  # eigenvalues below -threshold·λmax count as negative mass
    seed: int = 0
    hvp: HvpMethod = HvpMethod.auto
    rho: float = 0.05  # sharpness radius (parameter-space norm)
    average: bool = True  # average_sharpness(rho)
    worst_case: bool = True  # worst_case_sharpness(rho)
    samples: int = 32  # perturbations of the average sharpness
    ascent_steps: int = 20  # gradient-ascent steps of the worst-case sharpness
    norm: SharpnessNorm = SharpnessNorm.l2  # the worst-case ball
    adaptive: bool = False  # ASAM's ball ‖ε / |θ0|‖ ≤ rho


class Optimizer(StrEnum):
    sgd = "sgd"
    adam = "adam"


class FitMode(StrEnum):
    train = "train"  # BatchNorm on batch statistics, dropout on (Garipov et al.)
    eval = "eval"


@dataclass
class ConnectivityConfig:
    """The connectivity stage (``connectivity.enabled``): the paths from θ0 to ``towards``.

    The straight line (`landscapes.linear_path`) and, with ``bezier``, a quadratic Bézier curve
    whose bend is fitted (`landscapes.fit_bezier`), each evaluated at ``steps`` points with the
    metrics of ``metrics`` and ``compute.model_mode`` (``recompute_bn`` re-estimates BatchNorm
    statistics at each point); the loss and error barriers of both definitions are metrics.
    """

    enabled: bool = False
    towards: str | None = None  # the other end: a checkpoint path or MLflow URI
    steps: int = 25  # points on each path, both ends included
    bezier: bool = True  # also fit and evaluate a Bézier curve
    fit_steps: int = 200  # optimizer steps of the bend
    lr: float = 0.05
    seed: int = 0
    batch_size: int = 128
    optimizer: Optimizer = Optimizer.sgd
    fit_mode: FitMode = FitMode.train


@dataclass
class TrainOptions:
    """Options of the demo training (``python -m pipelines.train train.epochs=50``)."""

    epochs: int = 30
    checkpoint_every: int = 10
    seed: int = 0
    lr: float = 0.05
    batch_size: int = 64


@dataclass
class PipelineConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: dict[str, Any] = field(default_factory=dict)  # _target_ of the model class + kwargs
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    connectivity: ConnectivityConfig = field(default_factory=ConnectivityConfig)
    compare: bool = True  # run the compare stage at the end of a sweep
    resume: str | None = None  # a landscape.zarr to continue (re-running the same command also resumes)
    stop_after: StageName = StageName.report  # run the stages up to this one (upstream ones are reused)
    train: TrainOptions = field(default_factory=TrainOptions)


def to_typed(cfg: DictConfig) -> PipelineConfig:
    """The composed config as the schema's objects: dataclasses and Enums, interpolations resolved.

    Stages receive this, so a config key is named in this module only (``cfg.compute.model_mode``).

    Raises:
        ConfigurationError: a key the schema does not have. Hydra's ``+`` adds keys to any
            section without checking them, and converting to the schema would drop them
            silently (``+metrics.sharpness._target_=...`` would compute nothing).
    """
    _refuse_unknown_keys(cfg, PipelineConfig, "")
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key or "a key"
        hint = " (model=custom leaves it for you: model._target_=my_pkg.Net)" if key == "model._target_" else ""
        raise ConfigurationError(f"{key} is missing (???): set it on the command line or in a config{hint}.") from err
    if not isinstance(typed, PipelineConfig):
        raise TypeError(f"to_typed: expected a config composed on base_config, got {type(typed).__name__}")
    return typed


_WHERE_INSTEAD = {
    "metrics": "a custom metric goes under metrics.extra.<name>, e.g. "
    "'+metrics.extra.sharpness._target_=my_pkg.metrics.sharpness'",
    "compute": "the adapters of a model's input and output are adapters.forward and adapters.output",
}


def _refuse_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Raise on a key of ``node`` that the dataclass ``schema`` lacks, in any nested section."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        key = str(key)
        full = f"{prefix}{key}"
        if key not in hints:
            section = prefix.rstrip(".") or "the config"
            known = ", ".join(f.name for f in dataclasses.fields(schema))
            instead = _WHERE_INSTEAD.get(prefix.split(".")[0], "")
            raise ConfigurationError(
                f"{full}: {section} has no key {key!r} (its keys: {known}); "
                + (f"{instead}; " if instead else "")
                + "Hydra's '+' adds a key without checking it, so drop the '+' to override an "
                "existing key, or correct its name."
            )
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            _refuse_unknown_keys(node._get_node(key), sub, f"{full}.")


def job_name(checkpoint: Any) -> str:
    """A sweep job's folder name after its checkpoint (``conf/hydra/default.yaml`` puts the job number
    before it): the file's stem, a URI's path, ``demo`` for the demo's latest; safe characters only.

    >>> job_name("outputs/demo/checkpoints/epoch_010.pt"), job_name("runs:/0a1b/model"), job_name(None)
    ('epoch_010', 'runs_0a1b_model', 'demo')
    """
    if checkpoint is None or str(checkpoint) in ("", "None"):
        return "demo"
    text = str(checkpoint)
    text = re.sub(r":/+", "_", text) if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", text) else Path(text).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60] or "checkpoint"


def register_configs() -> None:
    """Store the schema as ``base_config`` and the ``landscapes.job_name`` resolver (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=PipelineConfig)
    if not OmegaConf.has_resolver("landscapes.job_name"):
        OmegaConf.register_new_resolver("landscapes.job_name", job_name)
