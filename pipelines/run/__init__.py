"""``python -m pipelines.run``: the whole pipeline, composed by Hydra from ``conf/``.

Examples::

    python -m pipelines.run                                   # demo model, 21x21 random plane
    python -m pipelines.run grid.steps=41 directions.seed=3
    python -m pipelines.run -m checkpoint.path=a.pt,b.pt,c.pt  # a sweep, then the comparison
    python -m pipelines.run experiment=1d_interpolation checkpoint.path=a.pt directions.towards=[b.pt]
    python -m pipelines.run.evaluate grid.steps=41            # one entry point per stage: runs up to it

The entry points sit on top of everything in ``pipelines``; nothing imports them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from pipelines.callbacks import errors_in_one_line, sweep_run_id
from pipelines.config import register_configs
from pipelines.paths import CONF_DIR, PROJECT_ROOT
from pipelines.pipeline import run_pipeline

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    with errors_in_one_line():
        result = run_pipeline(cfg, sweep_run_id=sweep_run_id())
    if not result["summary"]:
        made = ", ".join(f"{k} {result[k]}" for k in ("checkpoint", "directions", "store") if k in result)
        print(f"stopped after {cfg.stop_after.value}: {made}; MLflow run {result['run_id']}")
        return result
    s = result["summary"]
    print(f"landscape: {result['store']}  loss(θ0)={s.get('loss_at_theta0', float('nan')):.4g}  "
          f"min={s.get('loss_min', float('nan')):.4g}  MLflow run {result['run_id']}")
    return result


def run_main(stop_after: str | None = None) -> None:
    """Run `main` from the command line (``python -m pipelines.run[.<stage>]``), up to ``stop_after``."""
    os.environ.setdefault("LANDSCAPES_ROOT", str(PROJECT_ROOT))
    if stop_after is not None:
        sys.argv.append(f"stop_after={stop_after}")
    main()
