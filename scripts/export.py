"""Export a fine-tuned SAM as a plain segment_anything state dict, and optionally its decoder as ONNX.

    python scripts/export.py ckpt=outputs/pcb/runs/<time> out=sam_pcb.pth
    python scripts/export.py ckpt=outputs/pcb/runs/<time>/checkpoints/last.ckpt out=sam_pcb.pth onnx=decoder.onnx
    python scripts/export.py 'ckpt=[run/checkpoints/snapshots/step_001000.ckpt,run/checkpoints/last.ckpt]' out=avg.pth

Arguments (key=value):
    ckpt         Lightning checkpoint, or run directory (its best validation checkpoint, else last.ckpt); or a
                 list ckpt=[a.ckpt,b.ckpt,...] of checkpoints of one model, whose weights are averaged
                 (checkpoint averaging; README, "Export")
    out          destination .pth: segment_anything keys, LoRA merged; refuses to replace a file unless
                 overwrite=true
    onnx         also write the prompt encoder + mask decoder as ONNX (needs `pip install samtune[export]`)
    overwrite    replace existing out/onnx files (default false)
    base         base weights of a checkpoint that leaves frozen weights out (default: the recorded one)
    model_type, arch.<field>, seed, lora.<field>
                 override what the checkpoint / the run's config_resolved.yaml record
    use_best     for a run directory: best validation checkpoint (default: the run's eval.use_best)
    half         store float16 tensors (default false)
    onnx_opset   ONNX opset (default 17)
    onnx_single_mask  ONNX model returns the best mask only, as segment_anything's default (default true)
"""

from __future__ import annotations

import logging
import sys

KEYS = {"ckpt", "out", "onnx", "overwrite", "base", "model_type", "arch", "seed", "lora", "use_best", "half",
        "onnx_opset", "onnx_single_mask"}


def parse(argv: list[str]) -> dict:
    """key=value arguments -> dict (OmegaConf dot-list syntax, e.g. ``lora.rank=8``)."""
    from samtune.cli import parse_key_values

    return parse_key_values(argv, KEYS, __doc__, required=("ckpt", "out"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from samtune.model.build import build_sam_from_arch, infer_arch
    from samtune.model.export import check_onnx, export_onnx, export_state_dict, refuse_overwrite

    overwrite = bool(args.get("overwrite", False))
    refuse_overwrite(args.get("onnx"), overwrite, "onnx")  # before any work
    overrides = {k: args[k] for k in ("model_type", "arch", "seed", "lora") if k in args}
    _, state = export_state_dict(
        args["ckpt"], args["out"], overwrite=overwrite, base=args.get("base"), overrides=overrides,
        use_best=args.get("use_best"), half=bool(args.get("half", False)),
    )
    if args.get("onnx"):
        sam = build_sam_from_arch(infer_arch(state))
        sam.load_state_dict(state)
        single = bool(args.get("onnx_single_mask", True))
        export_onnx(sam, args["onnx"], overwrite=overwrite, opset=int(args.get("onnx_opset", 17)),
                    return_single_mask=single)
        try:
            diff = check_onnx(args["onnx"], sam, return_single_mask=single)
            logging.info("onnxruntime vs PyTorch: max abs difference %.2e", diff)
        except ImportError:
            logging.warning("onnxruntime is not installed: the ONNX file was not checked against PyTorch")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
