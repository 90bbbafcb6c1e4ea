"""``python -m pipelines.run``: the whole pipeline, composed by Hydra from ``conf/``.

Examples::

    python -m pipelines.run                                   # demo model, 21x21 random plane
    python -m pipelines.run grid.steps=41 directions.seed=3
    python -m pipelines.run -m checkpoint.path=a.pt,b.pt,c.pt  # a sweep, then the comparison
    python -m pipelines.run experiment=1d_interpolation checkpoint.path=a.pt directions.towards=[b.pt]
"""

from __future__ import annotations

import os
from typing import Any

import hydra
from omegaconf import DictConfig

from pipelines.callbacks import sweep_run_id
from pipelines.config import register_configs
from pipelines.pipeline import PROJECT_ROOT, run_pipeline

os.environ.setdefault("LANDSCAPES_ROOT", str(PROJECT_ROOT))
register_configs()


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    result = run_pipeline(cfg, sweep_run_id=sweep_run_id())
    if not result["summary"]:
        print(f"stopped after {cfg.stop_after.value}: {result}")
        return result
    s = result["summary"]
    print(f"landscape: {result['store']}  loss(θ0)={s.get('loss_at_theta0', float('nan')):.4g}  "
          f"min={s.get('loss_min', float('nan')):.4g}  MLflow run {result['run_id']}")
    return result


def stage_main(stage: str) -> None:
    """``python -m pipelines.stages.<stage>``: the pipeline up to ``stage`` (earlier stages are reused)."""
    import sys

    sys.argv.append(f"stop_after={stage}")
    main()


if __name__ == "__main__":
    main()
