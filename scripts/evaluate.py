"""Evaluate a starting or fine-tuned checkpoint: ``python scripts/evaluate.py experiment=pcb model.checkpoint=PATH``.

Hydra, with the same config groups as ``train.py`` (configs/evaluate.yaml). Writes ``report.json``,
``instances.jsonl`` and ``report.md`` into the run directory, exactly as training does.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from samtune.pipeline import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
