"""Export a fine-tuned SAM back into the SAM ecosystem (``scripts/export.py`` is the command).

* :func:`export_state_dict`: a samtune training checkpoint (or run directory) -> a plain
  segment_anything state dict, LoRA merged and frozen weights filled in from the base, loadable by
  ``sam_model_registry["vit_b"](checkpoint=...)`` (``build_model("sam_tiny", checkpoint=...)`` for
  sam_tiny).
* :func:`export_onnx`: the prompt encoder + mask decoder as ONNX, through segment_anything's own
  :class:`~segment_anything.utils.onnx.SamOnnxModel`, the way its ``scripts/export_onnx_model.py``
  exports the official model (same inputs, outputs and dynamic point axis); checked with onnxruntime
  by :func:`check_onnx`.

Settings a training checkpoint needs (model type, base checkpoint, seed, LoRA settings): what the
checkpoint itself records (``checkpoint["samtune"]``) comes first, the run's ``config_resolved.yaml``
fills what it does not record, and explicit overrides win over both.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from samtune.model.build import build_sam_from_arch, infer_arch, name_arch
from samtune.model.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint_file,
    save_state_dict,
    state_dict_from_checkpoint,
)
from samtune.model.training_checkpoint import META_KEY, settings_from_meta
from samtune.training.finetune_modes import finetune_mode

log = logging.getLogger(__name__)

RUN_CONFIG = "config_resolved.yaml"
ONNX_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


def refuse_overwrite(path: str | os.PathLike | None, overwrite: bool, key: str) -> None:
    """Raise FileExistsError if ``path`` exists and ``overwrite`` is false (nothing a user wrote is replaced)."""
    if path is not None and Path(path).exists() and not overwrite:
        raise FileExistsError(f"{key}={path} exists; pass overwrite=true to replace it")


def _best_of_run(last: Path) -> Path | None:
    """The best checkpoint that ``last.ckpt``'s ModelCheckpoint state names, if it is still there."""
    obj = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    for key, state in (obj.get("callbacks") or {}).items():
        # the callback that monitors a score (last.ckpt's own callback records itself as its "best")
        if str(key).startswith("ModelCheckpoint") and state.get("monitor") and state.get("best_model_path"):
            best = Path(state["best_model_path"])
            for candidate in (best, last.parent / best.name):  # the run directory may have moved
                if candidate.is_file():
                    return candidate
    return None


def find_checkpoint(path: str | os.PathLike, *, use_best: bool | None = None) -> tuple[Path, Path | None]:
    """Resolve ``ckpt=``: a checkpoint file, or a run directory (or its ``checkpoints/``).

    For a run directory the checkpoint the pipeline evaluated is chosen: the best validation
    checkpoint when ``use_best`` (default: the run's ``eval.use_best``, else true) and one is recorded,
    otherwise ``last.ckpt``.

    Returns:
        (checkpoint file, run directory holding ``config_resolved.yaml`` or None).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        run = p.parent if p.name == "checkpoints" and not (p / "checkpoints").is_dir() else p
        last = run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"ckpt={path}: no checkpoints/last.ckpt in that run directory")
        if use_best is None:
            cfg = run_config(run)
            use_best = bool(OmegaConf.select(cfg, "eval.use_best", default=True)) if cfg is not None else True
        best = _best_of_run(last) if use_best else None
        return (best or last), run
    if not p.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such checkpoint file or run directory")
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p, (run if (run / RUN_CONFIG).is_file() else None)


def run_config(run_dir: Path | None):
    """The run's resolved config (``config_resolved.yaml``), or None."""
    if run_dir is None or not (Path(run_dir) / RUN_CONFIG).is_file():
        return None
    return OmegaConf.load(Path(run_dir) / RUN_CONFIG)


def settings_from_config(cfg, run_dir: Path | None = None) -> dict:
    """Model type, arch, seed, base checkpoint and LoRA settings of a run's resolved config."""
    if cfg is None:
        return {}
    out = {}
    for key, path in (("model_type", "model.type"), ("seed", "seed")):
        if OmegaConf.select(cfg, path) is not None:
            out[key] = OmegaConf.select(cfg, path)
    if OmegaConf.select(cfg, "model.arch") is not None:
        out["arch"] = OmegaConf.to_container(cfg.model.arch)
    base = OmegaConf.select(cfg, "model.checkpoint", default=None)
    if base not in (None, "", "???"):
        base = Path(str(base)).expanduser()
        if not base.is_absolute():  # relative to where the run was started
            root = OmegaConf.select(cfg, "paths.root_dir", default=None)
            for anchor in (Path.cwd(), Path(root) if root else None, run_dir):
                if anchor is not None and (anchor / base).is_file():
                    base = anchor / base
                    break
        out["base_checkpoint"] = str(base)
    elif OmegaConf.select(cfg, "model") is not None:
        out["base_checkpoint"] = None  # the run started from random weights
    mode = OmegaConf.select(cfg, "finetune.mode", default=None)
    if mode is not None and finetune_mode(mode).uses_adapters and OmegaConf.select(cfg, "finetune.lora") is not None:
        out["lora"] = OmegaConf.to_container(cfg.finetune.lora)
    return out


def average_state_dicts(
    states: list[Mapping[str, torch.Tensor]], sources: list[str]
) -> dict[str, torch.Tensor]:
    """Uniform average of the weights of several checkpoints of one model (checkpoint averaging).

    Floating-point tensors are averaged in float32 and stored in the first state's dtype; other tensors
    (integer buffers) must be equal in every state.

    Raises:
        CheckpointError: the states do not hold the same keys and shapes (naming the checkpoint that differs).
    """
    first, name = states[0], sources[0]
    out = {}
    for state, source in zip(states[1:], sources[1:]):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise CheckpointError(f"cannot average {source} with {name}: keys differ "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise CheckpointError(f"cannot average {source} with {name}: {key} has shape "
                                      f"{tuple(tensor.shape)}, not {tuple(first[key].shape)}")
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = sum(state[key].detach().float() for state in states)
            out[key] = (total / len(states)).to(tensor.dtype)
        else:
            for state, source in zip(states[1:], sources[1:]):
                if not torch.equal(state[key], tensor):
                    raise CheckpointError(f"cannot average {source} with {name}: {key} is not a float tensor "
                                          "and differs")
            out[key] = tensor
    return out


def export_state_dict(
    ckpt: str | os.PathLike | list,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
    overrides: Mapping | None = None,
    use_best: bool | None = None,
    half: bool = False,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the plain segment_anything state dict of a samtune checkpoint or run to ``out``.

    Args:
        ckpt: Lightning checkpoint, run directory, or any checkpoint ``model.checkpoint`` accepts; or a list
            of them (checkpoints of one run, say the last few): each is exported, then their weights are
            averaged uniformly (checkpoint averaging, as fairseq's ``average_checkpoints.py`` or SWA).
        out: Destination ``.pth``.
        overwrite: Replace an existing ``out``.
        base: Base weights for a checkpoint that leaves frozen weights out (default: the recorded one).
        overrides: ``model_type``, ``arch``, ``seed``, ``lora`` overriding checkpoint and run config.
        use_best: For a run directory, export the best validation checkpoint (see :func:`find_checkpoint`).
        half: Store float16 tensors.

    Returns:
        (the checkpoint file that was exported (the first one for a list), the exported state dict).
    """
    refuse_overwrite(out, overwrite, "out")
    ckpts = list(ckpt) if isinstance(ckpt, (list, tuple)) else [ckpt]
    if not ckpts:
        raise ValueError("ckpt=[]: name at least one checkpoint")
    paths, states = zip(*(_exported_state(one, base=base, overrides=overrides, use_best=use_best) for one in ckpts))
    path, state = paths[0], states[0]
    if len(states) > 1:
        state = average_state_dicts(list(states), [str(p) for p in paths])
        log.info("Averaged the weights of %d checkpoints", len(states))
    arch = infer_arch(state)
    save_state_dict(state, out, half=half)
    log.info("Wrote %s (%s; loads with %s)", out, arch.describe(),
             f"sam_model_registry[{name_arch(arch)!r}]" if name_arch(arch) in ("vit_b", "vit_l", "vit_h")
             else "samtune.model.build_model")
    return path, state


def _exported_state(ckpt, *, base, overrides, use_best) -> tuple[Path, dict[str, torch.Tensor]]:
    """One checkpoint or run -> (its file, its complete segment_anything state dict, checked)."""
    path, run_dir = find_checkpoint(ckpt, use_best=use_best)
    log.info("Exporting %s", path)
    obj = load_checkpoint_file(path)
    config = settings_from_config(run_config(run_dir), run_dir)
    recorded = settings_from_meta(obj.get(META_KEY)) if isinstance(obj, dict) else {}
    for key in ("model_type", "lora"):
        if key in recorded and config.get(key) is not None and recorded[key] != config[key]:
            log.warning("%s: the checkpoint records %s=%s, %s says %s; using the checkpoint's",
                        path, key, recorded[key], RUN_CONFIG, config[key])
    state = state_dict_from_checkpoint(obj, path, base_checkpoint=base, settings=overrides, defaults=config)
    arch = infer_arch(state)
    if arch is None:
        raise CheckpointError(f"ckpt={path}: the exported weights are not a complete SAM")
    with torch.device("meta"):
        check_state_dict(build_sam_from_arch(arch), state, source=str(path), model_type=name_arch(arch) or "custom")
    return path, state


class DynamicSizeSamOnnxModel(SamOnnxModel):
    """segment_anything's :class:`SamOnnxModel` with the padding crop traced as a data-dependent op.

    ``SamOnnxModel.mask_postprocessing`` crops the padding with ``masks[..., :int(h), :int(w)]``;
    tracing turns those ints into constants of the example ``orig_im_size``, so the exported graph
    crops every other image size wrongly (the masks come out shifted). The same crop is written here
    with ``index_select``/``arange``, which ONNX keeps dynamic; everything else is the original class.
    """

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks.index_select(2, torch.arange(prepadded[0], device=masks.device))
        masks = masks.index_select(3, torch.arange(prepadded[1], device=masks.device))
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def onnx_example_inputs(sam: Sam, *, num_points: int = 5) -> dict[str, torch.Tensor]:
    """Inputs of the exported decoder, shaped as segment_anything's export script shapes them.

    ``image_embeddings`` 1 x C x h x w, ``point_coords`` 1 x N x 2 (XY in the model's input frame;
    a box is two points with labels 2 and 3), ``point_labels`` 1 x N, ``mask_input`` 1 x 1 x 4h x 4w,
    ``has_mask_input`` 1, ``orig_im_size`` 2 (H, W of the original image).
    """
    gen = torch.Generator().manual_seed(0)
    h, w = sam.prompt_encoder.image_embedding_size
    size = sam.image_encoder.img_size
    return {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, h, w, generator=gen),
        "point_coords": torch.randint(0, size, (1, num_points, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, num_points), generator=gen).float(),
        "mask_input": torch.randn(1, 1, 4 * h, 4 * w, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def onnx_model(sam: Sam, *, return_single_mask: bool = True) -> SamOnnxModel:
    """The module that is traced (puts ``sam``, a CPU fp32 model, in eval mode)."""
    return DynamicSizeSamOnnxModel(sam.eval(), return_single_mask=return_single_mask)


def export_onnx(
    sam: Sam,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    opset: int = 17,
    return_single_mask: bool = True,
) -> Path:
    """Export the prompt encoder + mask decoder of ``sam`` (a plain SAM, LoRA merged) to ONNX.

    Inputs and outputs are those of segment_anything's export script (see :func:`onnx_example_inputs`;
    outputs ``masks`` at the original size, ``iou_predictions``, ``low_res_masks``); the number of points
    is dynamic, as is ``orig_im_size``.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the `export` extra: pip install 'samtune[export]' (onnx, onnxruntime)") from exc
    refuse_overwrite(out, overwrite, "onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = onnx_model(sam, return_single_mask=return_single_mask)
    dummy = onnx_example_inputs(sam)
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model, tuple(dummy.values()), str(tmp), export_params=True, verbose=False, opset_version=opset,
            do_constant_folding=True, input_names=list(dummy), output_names=ONNX_OUTPUTS,
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}, dynamo=False,
        )
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, out)
    log.info("Wrote %s (prompt encoder + mask decoder, opset %d)", out, opset)
    return out


def check_onnx(path: str | os.PathLike, sam: Sam, inputs: Mapping[str, torch.Tensor] | None = None,
               *, return_single_mask: bool = True) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs of the decoder."""
    import onnxruntime

    inputs = dict(inputs or onnx_example_inputs(sam))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    want = onnx_model(sam, return_single_mask=return_single_mask)(*inputs.values())
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
