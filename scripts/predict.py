"""Segment new images with a fine-tuned or official SAM.

``python scripts/predict.py ckpt=CKPT input=IMAGE_OR_FOLDER mode=auto|box|points [prompts=JSON] out=DIR``
(Hydra, configs/predict.yaml; ``model=vit_b`` etc. for official architectures). Writes per image an instance-id
PNG (uint16), a COCO JSON (RLE, predicted IoU, stability score) and an overlay picture.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    from samtune.inference.predict import predict

    predict(cfg)


def _accept_prompts_argument(argv: list[str]) -> list[str]:
    """``prompts=JSON`` -> ``prompt_file=JSON``: Hydra would take ``prompts=`` for training's ``prompts`` group."""
    return [f"prompt_file={a.split('=', 1)[1]}" if a.startswith("prompts=") else a for a in argv]


if __name__ == "__main__":
    sys.argv = _accept_prompts_argument(sys.argv)
    main()
