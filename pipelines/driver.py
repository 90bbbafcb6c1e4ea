"""The loop over a stage table: one key per stage, each stage reused or run as a child run.

`pipelines.pipeline` declares the table (`STAGES`); this module knows no stage by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import landscapes
from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.stages.checkpoint import CheckpointInputs

__all__ = ["Flow", "Stage", "run_stages", "WHERE_FIELDS", "VERSION"]

VERSION = landscapes.__version__
WHERE_FIELDS = ("out_dir", "store", "provenance")  # inputs that say where outputs go: not in keys


@dataclass
class Flow:
    """One pipeline run so far: its config, resolved checkpoints, and each stage's outputs and identity."""

    cfg: PipelineConfig
    source: CheckpointInputs
    towards: tuple[Path, ...]
    stores: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, str] = field(default_factory=dict)  # what the keys of downstream stages see
    trajectory: tuple[Path, ...] = ()  # directions.trajectory (kind=pca), in training order
    origin: CheckpointInputs | None = None  # directions.origin: the shared plane's origin
    extra: dict[str, Any] = field(default_factory=dict)  # other resolved inputs (connectivity.towards)


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    fn: Callable[[PipelineConfig, Any], Any]  # the stage: (cfg, inputs) -> outputs dataclass
    sections: tuple[str, ...]  # config sections its key covers (logged as its params)
    upstream: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]  # stages whose outputs it reads
    inputs: Callable[[Flow], Any]  # its inputs dataclass
    place: Callable[[Flow, str], dict[str, Any]] = lambda flow, key: {}  # where outputs go, from its key
    identity: Callable[[Flow, Any], str] | None = None  # what downstream keys see (default: its key)
    intact: Callable[[Flow, Any], str | None] = lambda flow, out: None  # why finished outputs can't be reused
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True


def run_stages(stages: Sequence[Stage], flow: Flow, *, parent_run_id: str, experiment_id: str) -> None:
    """Run (or reuse) each enabled stage in order, up to and including ``cfg.stop_after``."""
    for stage in stages:
        if stage.enabled(flow.cfg):
            _run(stage, flow, parent_run_id, experiment_id)
        if stage.name == flow.cfg.stop_after:
            break


def _run(stage: Stage, flow: Flow, parent_run_id: str, experiment_id: str) -> None:
    inputs = stage.inputs(flow)
    what = {f.name: _text(getattr(inputs, f.name)) for f in dataclasses.fields(inputs) if f.name not in WHERE_FIELDS}
    params = {s: getattr(flow.cfg, s) for s in stage.sections}
    upstream = stage.upstream(flow.cfg) if callable(stage.upstream) else stage.upstream
    key = tracking.stage_key(stage.name, params | {"inputs": what}, [flow.identity[u] for u in upstream], VERSION)
    inputs = dataclasses.replace(inputs, **stage.place(flow, key))
    try:
        out = tracking.run_stage(stage.name, stage.fn, flow.cfg, inputs, parent_run_id=parent_run_id,
                                 experiment_id=experiment_id, key=key, params=params, reuse=flow.cfg.tracking.reuse,
                                 check=lambda out: stage.intact(flow, out))
    except Exception as err:
        err.add_note(f"in the {stage.name!r} stage of the pipeline (finished stages are kept and reused on re-run)")
        raise
    flow.outputs[stage.name] = out
    flow.identity[stage.name] = stage.identity(flow, out) if stage.identity else key


def _text(value: Any) -> Any:
    """An input's identity in a key: its text (paths as strings, tuples as lists of strings)."""
    return [str(v) for v in value] if isinstance(value, tuple) else str(value)
