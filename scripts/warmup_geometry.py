"""Write a randomly initialised SAM whose prompt encoder and mask decoder learnt prompt geometry.

The first stage of the sam_tiny generalist (see samtune/training/geometry_warmup.py and the model card
data/checkpoints/sam_tiny_generalist.md):

    python scripts/warmup_geometry.py out=outputs/geometry_warmup.pth
    python train.py experiment=generalist model.checkpoint=outputs/geometry_warmup.pth

Arguments (key=value):
    out        destination state dict (segment_anything keys); refuses to replace a file unless overwrite=true
    model      model type (default sam_tiny); arch.<field> overrides the architecture
    seed       seed of the random initialisation and of the warm-up's prompts (default 0)
    steps      optimiser steps (default 600): boxes only for the first half, then boxes and points alternate
    prompts    prompts per step (default 16)
    lr         AdamW learning rate (default 1e-3)
    overwrite  replace an existing out file (default false)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

KEYS = {"out", "model", "arch", "seed", "steps", "prompts", "lr", "overwrite"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    from samtune.cli import parse_key_values

    args = parse_key_values(argv, KEYS, __doc__, required=("out",))
    from samtune.model.export import refuse_overwrite

    out = Path(args["out"])
    refuse_overwrite(out, bool(args.get("overwrite", False)), "out")  # before any work
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from samtune.model.build import build_seeded_sam, resolve_arch
    from samtune.model.checkpoint import save_sam_weights
    from samtune.training.geometry_warmup import geometry_warmup

    seed = int(args.get("seed", 0))
    torch.manual_seed(seed)
    sam = build_seeded_sam(resolve_arch(str(args.get("model", "sam_tiny")), args.get("arch")), seed)
    stats = geometry_warmup(sam, steps=int(args.get("steps", 600)), prompts_per_step=int(args.get("prompts", 16)),
                            lr=float(args.get("lr", 1e-3)), seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_sam_weights(sam, out)
    logging.info("wrote %s (box IoU %.3f, point IoU %.3f after %d steps)", out, stats.box_iou, stats.point_iou,
                 stats.steps)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
