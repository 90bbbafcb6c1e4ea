"""Structured-config schemas of the pipeline; ``register_configs()`` stores them for Hydra.

The top-level :class:`PipelineConfig` is the schema of ``conf/config.yaml`` (its defaults list
starts with ``base_config``), so a wrong type or an unknown key in any group fails when
Hydra composes the config (keys added with Hydra's ``+`` are, by Hydra's design, not checked). Field names equal the library keywords they feed; choices are
``str`` Enums whose values are the library's strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(StrEnum):
    auto = "auto"
    loop = "loop"
    vmap = "vmap"
    batched = "batched"


class ModelMode(StrEnum):
    eval = "eval"
    train = "train"


class Backend(StrEnum):
    local = "local"
    dask = "dask"


class StageName(StrEnum):
    checkpoint = "checkpoint"
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


@dataclass
class GridConfig:
    dims: int = 2
    steps: Any = 21  # int, or one per axis
    range: Any = field(default_factory=lambda: [-1.0, 1.0])  # [lo, hi], or one pair per axis


@dataclass
class MetricsConfig:
    loss: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})
    accuracy: bool = True


@dataclass
class ComputeConfig:
    device: Device = Device.auto
    strategy: Strategy = Strategy.auto
    model_mode: ModelMode = ModelMode.eval
    memory_budget: int | None = None  # bytes per tile
    max_batch_points: int | None = None  # grid points per tile (tile = Zarr chunk)
    backend: Backend = Backend.local
    workers: int = 2
    threads_per_worker: int = 1
    scheduler: str | None = None  # address of an existing dask scheduler, e.g. tcp://host:8786
    connect_timeout: float = 10.0  # seconds to reach compute.scheduler
    no_workers_timeout: float = 60.0  # seconds a dask cluster may have no workers before the run fails
    progress: bool = True


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


@dataclass
class SummaryConfig:
    radius: float = 0.1  # sharpness: mean loss increase within this coordinate radius of θ0
    flat_tolerance: float = 0.1  # flat area: fraction of points with loss ≤ (1 + tol)·loss(θ0)


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
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    compare: bool = True  # run the compare stage at the end of a sweep
    resume: str | None = None  # a landscape.zarr to continue (re-running the same command also resumes)
    stop_after: StageName = StageName.report  # run the stages up to this one (upstream ones are reused)
    train: TrainOptions = field(default_factory=TrainOptions)


def to_typed(cfg: DictConfig) -> PipelineConfig:
    """The composed config as the schema's objects: dataclasses and Enums, interpolations resolved.

    Stages receive this, so a config key is named in this module only (``cfg.compute.model_mode``).
    """
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, PipelineConfig):
        raise TypeError(f"to_typed: expected a config composed on base_config, got {type(typed).__name__}")
    return typed


def register_configs() -> None:
    """Store the schema as ``base_config`` (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=PipelineConfig)
