"""``python -m pipelines.train [train.epochs=50 ...]``: train the demo model into ``paths.demo_dir``.

Uses the pipeline's config (``conf/config.yaml``), so the tracking store, experiment and
checkpoint folder are the ones ``python -m pipelines.run`` reads. The training itself lives in
`pipelines.training`.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from pipelines import tracking
from pipelines.config import register_configs, to_typed
from pipelines.inputs import demo_train_config
from pipelines.paths import CONF_DIR, PROJECT_ROOT
from pipelines.training import TrainConfig, TrainResult, train, train_demo

__all__ = ["TrainConfig", "TrainResult", "train", "train_demo", "main"]

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    result = train(demo_train_config(typed, tracking.configure(typed.tracking.uri)))
    print(f"training run {result.run_id}: accuracy {result.final_accuracy:.4f}, loss {result.final_loss:.4f}")
    for path in result.checkpoints:
        print(f"  {path}")


if __name__ == "__main__":
    os.environ.setdefault("LANDSCAPES_ROOT", str(PROJECT_ROOT))
    main()
