"""A new stage is one row of the stage table and one function: the driver runs and reuses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from landscapes.store import LandscapeStore
from pipelines.config import PipelineConfig
from pipelines.driver import Stage
from pipelines.pipeline import STAGES

CALLS: list[Path] = []


@dataclass(frozen=True)
class SpreadInputs:
    store: Path


@dataclass(frozen=True)
class SpreadOutputs:
    spread: float
    metrics: dict[str, float] = field(default_factory=dict)


def spread(cfg: PipelineConfig, inputs: SpreadInputs) -> SpreadOutputs:
    """A trivial stage: the range of the loss over the grid."""
    CALLS.append(inputs.store)
    loss = LandscapeStore.open(inputs.store, mode="r").read("loss")
    value = float(np.nanmax(loss) - np.nanmin(loss))
    return SpreadOutputs(spread=value, metrics={"loss_spread": value})


SPREAD = Stage("spread", spread, ("summary",), ("evaluate",), inputs=lambda f: SpreadInputs(f.outputs["evaluate"].store))
_AFTER = [s.name for s in STAGES].index("aggregate") + 1
WITH_SPREAD = (*STAGES[:_AFTER], SPREAD, *STAGES[_AFTER:])  # after aggregate, before report


def test_a_new_stage_runs_as_a_child_run_and_is_reused(project) -> None:
    CALLS.clear()
    first = _run(project)
    runs = project.stages(first["run_id"])
    assert set(runs) == {"checkpoint", "directions", "evaluate", "aggregate", "spread", "report"}
    loss = LandscapeStore.open(first["store"], mode="r").read("loss")
    assert runs["spread"].data.metrics["loss_spread"] == float(np.nanmax(loss) - np.nanmin(loss)) > 0
    assert runs["spread"].info.status == "FINISHED"
    assert len(CALLS) == 1

    second = _run(project)
    parent = project.client.get_run(second["run_id"]).data.tags
    assert parent["landscapes.stage_run.spread"] == runs["spread"].info.run_id  # reused, not run again
    assert project.stages(second["run_id"]) == {}  # every stage reused: no new child runs
    assert len(CALLS) == 1


def _run(project) -> dict:
    return project.run("debug=default", stages=WITH_SPREAD)
