"""Each stage has its own entry point: ``python -m pipelines.run.<name>`` runs up to it."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_stage_entry_point_runs_up_to_that_stage(project) -> None:
    proc = project.cli("pipelines.run.directions", "debug=default")
    assert "stopped after directions" in proc.stdout
    (parent,) = project.search("tags.`landscapes.kind` = 'pipeline'")
    assert set(project.stages(parent.info.run_id)) == {"checkpoint", "directions"}
    assert parent.info.status == "FINISHED"
