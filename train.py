"""samtune entry point: ``python train.py experiment=pcb`` (Hydra; see configs/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from samtune.pipeline import train

    metrics = train(cfg)
    # Sweepers (Hydra multirun, Optuna) optimise the value returned here.
    return metrics.get(cfg.get("optimized_metric") or "val/miou")


if __name__ == "__main__":
    main()
