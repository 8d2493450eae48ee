"""Load SAM weights with errors that say what is wrong and how to fix it.

Accepted files:

* an official segment_anything state dict (``sam_vit_b_01ec64.pth`` ...), or one written in the same
  format by samtune (``scripts/export.py``, the shipped ``sam_tiny`` generalist);
* a samtune Lightning checkpoint (``checkpoints/last.ckpt``): the SAM weights are taken from its
  ``state_dict`` under the ``model.sam.`` prefix. Such a checkpoint stores only the trained weights
  (frozen ones are left out): they are applied on top of the base weights the checkpoint records,
  and LoRA adapters are merged, so the result is always a complete plain state dict
  (see :mod:`samtune.model.training_checkpoint`; a missing base gives an error naming the file).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn

from samtune.model.build import CHECKPOINT_HELP, OFFICIAL_CHECKPOINTS, SamArch, infer_arch, name_arch
from samtune.model.errors import CheckpointError
from samtune.model.lora import plain_state_dict
from samtune.model.training_checkpoint import META_KEY, SAM_PREFIX, resolve_training_state
from samtune.utils.io import temp_file_beside

LIGHTNING_PREFIX = SAM_PREFIX


def load_checkpoint_file(path: str | os.PathLike) -> object:
    """``torch.load`` a checkpoint on the CPU (tensors and plain containers only).

    Raises:
        CheckpointError: the file is missing (the message says where official weights are published)
            or is not a PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        names = ", ".join(f"{k}: {v}" for k, v in OFFICIAL_CHECKPOINTS.items())
        raise CheckpointError(
            f"model.checkpoint={path}: file not found. {CHECKPOINT_HELP} Files: {names}. "
            "Download one and pass its path, e.g. `model=vit_b model.checkpoint=/path/sam_vit_b_01ec64.pth`."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a readable checkpoint"
        raise CheckpointError(f"model.checkpoint={path}: not a readable PyTorch checkpoint ({exc})") from exc


def read_state_dict(
    path: str | os.PathLike,
    *,
    base_checkpoint: str | os.PathLike | None = None,
    settings: Mapping | None = None,
    defaults: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """Read the complete SAM state dict stored in ``path`` (segment_anything's keys).

    Args:
        path: Official/plain state dict or samtune Lightning checkpoint.
        base_checkpoint: For a training checkpoint that leaves frozen weights out: where they come
            from, instead of the base checkpoint it records.
        settings: Overrides of what a training checkpoint records (``model_type``, ``arch``, ``seed``,
            ``lora``); see :func:`samtune.model.training_checkpoint.resolve_training_state`.
        defaults: Values used only where a training checkpoint records nothing.

    Raises:
        CheckpointError: the file is missing (the message says where official weights are published),
            is not a PyTorch checkpoint, or holds no SAM weights; a training checkpoint's base weights
            are missing.
    """
    return state_dict_from_checkpoint(
        load_checkpoint_file(path), path, base_checkpoint=base_checkpoint, settings=settings, defaults=defaults,
    )


def state_dict_from_checkpoint(
    obj: object,
    source: str | os.PathLike,
    *,
    base_checkpoint: str | os.PathLike | None = None,
    settings: Mapping | None = None,
    defaults: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` for a checkpoint already loaded by :func:`load_checkpoint_file`."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        inner = obj["state_dict"]
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in inner.items() if k.startswith(LIGHTNING_PREFIX)}
        if not state:
            raise CheckpointError(f"model.checkpoint={source}: Lightning checkpoint without `{LIGHTNING_PREFIX}*` weights")
        meta = obj.get(META_KEY)
        if meta is not None or any(".lora_" in k for k in state):
            overrides = dict(settings or {})
            if base_checkpoint is not None:
                overrides["base_checkpoint"] = str(base_checkpoint)
            return resolve_training_state(source, state, meta, settings=overrides, defaults=defaults,
                                          read_base=read_state_dict)
        return state
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model.checkpoint={source}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _describe_owner(state: dict[str, torch.Tensor]) -> str:
    arch = infer_arch(state)
    if arch is None:
        return "It does not look like a SAM checkpoint (no image_encoder/mask_decoder weights of SAM's layout)."
    name = name_arch(arch)
    if name is not None:
        return f"It looks like a `{name}` checkpoint: use model={name}."
    return (
        f"It holds a SAM of another size ({arch.describe()}); select a model config with that "
        "architecture (model.arch.* overrides)."
    )


def check_state_dict(model: Sam, state: dict[str, torch.Tensor], *, source: str, model_type: str) -> None:
    """Raise :class:`CheckpointError` if ``state`` does not exactly fit ``model``.

    The message lists missing and unexpected keys and shape mismatches (the first few of each) and,
    when the weights' architecture can be recognised, the model type they belong to.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"model.checkpoint={source} does not fit model={model_type}."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {title}: {items[:5]}{more}.")
    parts.append(_describe_owner(state))
    raise CheckpointError(" ".join(parts))


def load_sam_weights(
    model: Sam, path: str | os.PathLike, *, model_type: str, base_checkpoint: str | os.PathLike | None = None
) -> None:
    """Load the checkpoint at ``path`` into ``model`` strictly, with explanatory errors.

    ``base_checkpoint``: see :func:`read_state_dict` (training checkpoints that leave frozen weights out).
    """
    state = read_state_dict(path, base_checkpoint=base_checkpoint)
    check_state_dict(model, state, source=str(path), model_type=model_type)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})


def save_sam_weights(model: Sam, path: str | os.PathLike, *, half: bool = False) -> Path:
    """Write ``model``'s weights as a plain segment_anything state dict, atomically.

    Args:
        model: The SAM to save; LoRA adapters, if any, are merged into the saved weights (``model``
            itself is not changed).
        path: Destination ``.pth``; written to a temporary file in the same folder, then renamed.
        half: Store floating-point tensors as float16 (loaders cast back to the model's dtype).
    """
    return save_state_dict(plain_state_dict(model), path, half=half)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *, half: bool = False) -> Path:
    """Write a state dict with ``torch.save`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()
    }
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def weights_fingerprint(module: nn.Module) -> str:
    """blake2b-128 over every tensor of ``module.state_dict()`` (name, dtype, shape, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def arch_of_checkpoint(path: str | os.PathLike) -> SamArch | None:
    """Architecture of the SAM stored at ``path`` (None if it is not recognisable)."""
    return infer_arch(read_state_dict(path))
