"""The pipeline's evaluate stage on a benchmark workload, as a user runs it.

:class:`StageBench` writes the W-MLP-a model (``benchmarks.workloads``: the digits MLP
64-128-128-10, trained, all 1797 samples as one batch) as a checkpoint of the demo model class
it equals (``pipelines.demo.DemoMLP``: the same ``nn.Sequential`` under ``net``), composes the
pipeline's config from ``conf/`` (``model=demo_mlp``, ``data=digits``), makes the directions once
with the directions stage, and then runs ``pipelines.stages.evaluate.evaluate`` with a config composed beforehand
into a fresh Zarr store each time: the checkpoint and data loaded, the grid cut into tiles, each tile evaluated,
written and marked done, as ``python -m pipelines.run`` does (without MLflow).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


class StageBench:
    """The evaluate stage of W-MLP-a, ready to run on any grid size and compute options.

    Args:
        workdir: an empty folder for the checkpoint, the directions and the stores.
    """

    def __init__(self, workdir: Path) -> None:
        from benchmarks.workloads import _mlp_workloads
        from pipelines.config import register_configs
        from pipelines.demo import DemoMLP
        from pipelines.stages.directions import DirectionsInputs, directions

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        register_configs()
        workload = _mlp_workloads(torch.device("cpu"), 3)[0]  # W-MLP-a (the grid size is ours)
        self.description = f"{workload.name}: {workload.description}"
        model = DemoMLP()
        model.net.load_state_dict(workload.model.state_dict())
        self.checkpoint = self.workdir / "model.pt"
        torch.save(model.state_dict(), self.checkpoint)
        self.directions = directions(self.config(3), DirectionsInputs(checkpoint=self.checkpoint, out_dir=self.workdir)).path
        self._runs = 0

    def config(self, steps: int, *overrides: str) -> Any:
        """The typed pipeline config for a ``steps × steps`` plane (progress off), plus ``overrides``."""
        from hydra import compose, initialize_config_dir

        from pipelines.config import to_typed

        saved = os.environ.get("LANDSCAPES_ROOT")
        os.environ["LANDSCAPES_ROOT"] = str(self.workdir)
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                raw = compose("config", overrides=[
                    f"paths.output_dir={self.workdir}/out", f"grid.steps={steps}", "compute.progress=false",
                    *overrides])
            return to_typed(raw)
        finally:
            if saved is None:
                os.environ.pop("LANDSCAPES_ROOT", None)
            else:
                os.environ["LANDSCAPES_ROOT"] = saved

    def run(self, cfg: Any, backend: Any = None) -> Any:
        """One run of the evaluate stage with ``cfg`` (see :meth:`config`: composing is not timed
        here; a pipeline run composes once) into a fresh store; its ``EvaluateOutputs``. Call
        :meth:`discard` after timing it, to delete the store."""
        from pipelines.stages.evaluate import EvaluateInputs, evaluate

        self._runs += 1
        store = self.workdir / f"landscape-{self._runs}.zarr"
        inputs = EvaluateInputs(checkpoint=self.checkpoint, directions=self.directions, store=store,
                                fingerprint=f"bench-{self._runs:08d}")
        return evaluate(cfg, inputs, backend)

    def discard(self) -> None:
        """Delete the stores (and their lock files) of the runs so far."""
        for path in self.workdir.glob("landscape-*.zarr*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
