"""``predict(cfg)``: what ``python scripts/predict.py ckpt=... input=... mode=... out=...`` runs."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from samtune.data.io import load_image
from samtune.inference.outputs import check_output_dir, write_image_outputs, write_marker
from samtune.inference.prompts_file import load_prompt_file
from samtune.inference.segment import list_images, segment_everything, segment_prompts
from samtune.model.factory import build_model
from samtune.predict.auto import build_mask_generator, explain_no_masks, filter_stats
from samtune.predict.modes import PREDICT_MODES
from samtune.predict.zoom import zoom_config
from samtune.utils.device import eval_device
from samtune.utils.progress import progress

log = logging.getLogger(__name__)

MODES = PREDICT_MODES


def _path(value: object, key: str) -> Path:
    if value is None or str(value) in ("", "???"):
        raise ValueError(f"{key}= is required (see README: inference)")
    return Path(hydra.utils.to_absolute_path(str(value)))


def predict(cfg: DictConfig) -> dict:
    """Segment every input image and write its outputs; return a summary ``{"images", "masks", "out"}``."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    input_path = _path(cfg.get("input"), "input")
    out = _path(cfg.get("out"), "out")
    # ckpt= first; model.checkpoint (the default sam_tiny generalist) is only resolved when ckpt= is not given
    ckpt_value = cfg.get("ckpt") or OmegaConf.select(cfg, "model.checkpoint", default=None, throw_on_missing=False)
    ckpt = _path(ckpt_value, "ckpt")
    zoom = zoom_config(cfg, where="")
    if zoom is not None and mode == "auto":
        raise ValueError("zoom= applies to box and points prompts; mode=auto zooms with auto.zoom (a crop of that "
                         "many times each candidate's extent)")
    inputs = list_images(input_path)
    prompts: dict[str, list[dict]] = {}
    if mode != "auto":
        prompts = load_prompt_file(_path(cfg.get("prompt_file"), "prompts"), mode, [k for _, k in inputs])
        missing = [k for _, k in inputs if k not in prompts]
        if missing:
            log.warning("%d images have no %s prompts and get no masks, e.g. %s", len(missing), mode, missing[:3])
    auto_params = OmegaConf.to_container(cfg.auto, resolve=True) if mode == "auto" else None
    settings = {
        "ckpt": str(ckpt), "model_type": str(cfg.model.type), "input": str(input_path), "mode": mode,
        "prompts": str(_path(cfg.prompt_file, "prompts")) if mode != "auto" else None,
        "zoom": zoom.describe() if zoom else None, "auto": auto_params,
    }
    check_output_dir(out, inputs, input_path, settings, bool(cfg.overwrite))
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, settings, {"finished": False})

    model = build_model(cfg.model.type, checkpoint=ckpt, arch=cfg.model.get("arch"), seed=int(cfg.get("seed", 0)))
    model.to(eval_device(cfg)).eval()
    generator = build_mask_generator(model, auto_params) if mode == "auto" else None
    offset = float(cfg.auto.stability_score_offset)
    info = {"description": "samtune predictions", "checkpoint": str(ckpt), "model_type": str(cfg.model.type),
            "mode": mode}
    n_masks = 0
    for path, key in progress(inputs, desc=f"predict {mode}"):
        image = load_image(path)
        if mode == "auto":
            preds = segment_everything(generator, image)
        else:
            preds = segment_prompts(model, image, prompts.get(key, []), mode, zoom=zoom, stability_offset=offset)
        write_image_outputs(out, key, image, preds, info)
        n_masks += len(preds)
    summary = {"images": len(inputs), "masks": n_masks, "out": str(out)}
    marker = {"finished": True, "images": len(inputs), "masks": n_masks}
    if generator is not None:
        marker["filters"] = summary["filters"] = filter_stats(generator)
        if n_masks == 0 and inputs:
            why = explain_no_masks(generator, "auto")
            marker["why_no_masks"] = summary["why_no_masks"] = why
            log.warning(why)
    write_marker(out, settings, marker)
    log.info("Wrote %d masks of %d images to %s", n_masks, len(inputs), out)
    return summary
