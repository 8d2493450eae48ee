"""samtune's Lightning training checkpoints and how to get a plain SAM state dict back from them.

To keep checkpoints small, a training checkpoint (``checkpoints/last.ckpt``, the best
``epoch_*.ckpt``) stores only what trains: for ``finetune=decoder_only`` the mask decoder, for
``finetune=lora`` the LoRA matrices and the decoder, for ``finetune=full`` everything. Next to the
weights it records, under ``checkpoint["samtune"]``, where the frozen weights come from::

    {"format": 1,
     "base": {"model_type": "vit_b", "arch": {}, "seed": 42, "base_checkpoint": "/abs/sam_vit_b_01ec64.pth"},
     "finetune": {"mode": "lora", "lora": {"rank": 8, ...}},
     "base_fingerprint": {"image_encoder.patch_embed.proj.weight": [sum, abs_sum], ...}}

``base_checkpoint: null`` means the run started from random weights, which ``(model_type, arch,
seed)`` reproduce exactly. :func:`resolve_training_state` rebuilds the complete state dict: the base
weights, the stored weights on top, LoRA merged. If the base file is gone it stops with an error
that says which file is needed and how to pass another copy (``base_checkpoint=``, or
``scripts/export.py ... base=PATH``); the fingerprint catches a base with different weights.

Both sides of this format live here: what a training run leaves out when it saves
(:func:`frozen_state_keys`, :func:`strip_frozen`), how a run that resumes or reloads a checkpoint completes it
from its own live weights (:func:`complete_partial_state`), and how a file alone is completed
(:func:`resolve_training_state`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from samtune.model.build import build_sam_from_arch, build_seeded_sam, infer_arch, resolve_arch
from samtune.model.errors import CheckpointError
from samtune.model.lora import apply_lora, plain_state_dict

META_KEY = "samtune"
META_FORMAT = 1
SAM_PREFIX = "model.sam."  # the SAM weights' prefix in a Lightning checkpoint's state_dict
SETTING_KEYS = ("model_type", "arch", "seed", "base_checkpoint", "lora")


def plain_key(key: str) -> str:
    """segment_anything's key of a possibly LoRA-wrapped key (``qkv.base_layer.weight`` -> ``qkv.weight``)."""
    return key.replace(".base_layer.", ".")


def fingerprint(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, list[float]]:
    """``{plain key: [sum, sum of absolute values]}`` (float64) of the tensors under ``keys``."""
    out = {}
    for key in sorted(keys):
        t = state[key].detach().to("cpu", torch.float64)
        out[plain_key(key)] = [float(t.sum()), float(t.abs().sum())]
    return out


def fingerprint_mismatches(recorded: Mapping[str, list[float]], base: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose base tensor is missing or differs from the recorded fingerprint (relative 1e-6)."""
    bad = []
    for key, (total, abs_total) in recorded.items():
        if key not in base:
            bad.append(key)
            continue
        now = fingerprint(base, [key])[key]
        tol = 1e-6 * max(abs_total, 1.0)
        if not (math.isclose(now[0], total, abs_tol=tol) and math.isclose(now[1], abs_total, abs_tol=tol)):
            bad.append(key)
    return bad


def frozen_state_keys(module: torch.nn.Module, prefix: str = SAM_PREFIX) -> set[str]:
    """State-dict keys of ``module`` left out of its checkpoints: frozen parameters, and the buffers of SAM
    components (image encoder, prompt encoder, mask decoder) that have nothing to train."""
    params = dict(module.named_parameters())
    trained_parts = {n[len(prefix):].split(".")[0] for n, p in params.items() if p.requires_grad}
    frozen = set()
    for key in module.state_dict(keep_vars=True):
        if not key.startswith(prefix):
            continue
        if key in params:
            if not params[key].requires_grad:
                frozen.add(key)
        elif key[len(prefix):].split(".")[0] not in trained_parts:
            frozen.add(key)
    return frozen


def strip_frozen(checkpoint: dict, frozen: Iterable[str], record: Mapping) -> None:
    """Leave the ``frozen`` weights out of a Lightning ``checkpoint`` about to be saved and record, under
    :data:`META_KEY`, where they come from (``record``, see the module docstring)."""
    state = checkpoint["state_dict"]
    for key in frozen:
        state.pop(key, None)
    checkpoint[META_KEY] = dict(record)


def check_saved_mode(meta: Mapping, mode: str) -> None:
    """Refuse a checkpoint trained in another ``finetune.mode`` than ``mode``."""
    saved_mode = (meta.get("finetune") or {}).get("mode")
    if saved_mode and saved_mode != mode:
        raise ValueError(f"the checkpoint was trained with finetune={saved_mode}, this run uses finetune={mode}")


def complete_partial_state(state: dict, meta: Mapping, own: Mapping[str, torch.Tensor], frozen: set[str],
                           prefix: str = SAM_PREFIX) -> None:
    """Complete a loaded checkpoint's ``state`` (which leaves ``frozen`` out) with the live model's weights
    ``own``, after checking that every trained weight is there and that the frozen ones are those it was trained
    on (the recorded ``base_fingerprint``).

    Raises:
        ValueError: trained weights missing (other finetune settings), or frozen weights from another base.
    """
    missing = sorted(k for k in own if k.startswith(prefix) and k not in frozen and k not in state)
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} trained weights, e.g. {missing[:3]}: it was saved with "
            "other finetune settings"
        )
    recorded = meta.get("base_fingerprint") or {}
    bad = fingerprint_mismatches(recorded, {plain_key(k[len(prefix):]): v for k, v in own.items()})
    if bad:
        raise ValueError(
            f"the checkpoint's frozen weights came from another base ({(meta.get('base') or {}).get('base_checkpoint')}) "
            f"than this run's model.checkpoint ({len(bad)} tensors differ, e.g. {bad[:3]})"
        )
    for key in frozen:
        state.setdefault(key, own[key])


def settings_from_meta(meta: Mapping | None) -> dict:
    """The (model_type, arch, seed, base_checkpoint, lora) a checkpoint records; absent keys left out."""
    meta = meta or {}
    out = {k: v for k, v in (meta.get("base") or {}).items() if k in SETTING_KEYS}
    finetune = meta.get("finetune") or {}
    if "lora" in finetune:
        out["lora"] = finetune["lora"]
    return out


def _base_state(source: str, settings: Mapping, n_omitted: int,
                read_base: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    how = (
        "Pass the base weights explicitly: `python scripts/export.py ckpt=CKPT base=PATH out=plain.pth` "
        "writes a complete state dict (or, in Python, build_model(..., base_checkpoint=PATH))."
    )
    base = settings.get("base_checkpoint")
    if base not in (None, ""):
        if not Path(str(base)).is_file():
            raise CheckpointError(
                f"{source} stores only the trained weights ({n_omitted} frozen tensors are not in it); they come "
                f"from its base checkpoint {base}, which is not found. {how}"
            )
        return read_base(str(base))
    if "base_checkpoint" not in settings or not settings.get("model_type"):
        raise CheckpointError(
            f"{source} stores only the trained weights ({n_omitted} frozen tensors are not in it) and does not "
            f"record its base checkpoint. {how}"
        )
    arch = resolve_arch(str(settings["model_type"]), dict(settings.get("arch") or {}))
    return build_seeded_sam(arch, int(settings.get("seed") or 0)).state_dict()


def resolve_training_state(
    source: str | os.PathLike,
    stored: Mapping[str, torch.Tensor],
    meta: Mapping | None,
    *,
    settings: Mapping | None = None,
    defaults: Mapping | None = None,
    read_base: Callable[[str], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Complete, plain segment_anything state dict of a samtune training checkpoint.

    Args:
        source: The checkpoint's path (for messages).
        stored: Its SAM weights (``model.sam.`` prefix removed), possibly partial and with LoRA keys.
        meta: Its ``checkpoint["samtune"]`` record (None for checkpoints without one).
        settings: Overrides of the recorded ``model_type``, ``arch``, ``seed``, ``base_checkpoint``,
            ``lora`` (None values are ignored).
        defaults: Values used only where the checkpoint records nothing (e.g. a run's config); here
            ``base_checkpoint: None`` means "started from random weights".
        read_base: Reads a base checkpoint's complete state dict
            (:func:`samtune.model.checkpoint.read_state_dict`, which calls this function for training checkpoints:
            passed in, so that neither module imports the other).

    Raises:
        CheckpointError: base weights missing or different from the ones trained on; LoRA weights
            without LoRA settings, or settings that do not fit them.
    """
    source = str(source)
    merged = {k: v for k, v in (defaults or {}).items() if k in SETTING_KEYS}
    merged.update(settings_from_meta(meta))
    merged.update({k: v for k, v in (settings or {}).items() if v is not None})
    recorded = (meta or {}).get("base_fingerprint") or {}
    full: dict[str, torch.Tensor] = {}
    if recorded:
        base = {k: v.float() if v.is_floating_point() else v for k, v in _base_state(source, merged, len(recorded), read_base).items()}
        bad = fingerprint_mismatches(recorded, base)
        if bad:
            raise CheckpointError(
                f"{source}: the base weights ({merged.get('base_checkpoint') or 'random init'}) differ from those it was "
                f"trained on in {len(bad)} tensors, e.g. {bad[:3]}; pass the base checkpoint of that run."
            )
        full.update(base)
    prefixes = {k.split(".lora_")[0] for k in stored if ".lora_" in k}
    if not prefixes:
        full.update(stored)
        return full
    if not merged.get("lora"):
        raise CheckpointError(f"{source} holds LoRA weights but no LoRA settings (finetune.lora): pass them")
    wrapped = {}
    for key, value in full.items():
        owner, _, leaf = key.rpartition(".")
        wrapped[f"{owner}.base_layer.{leaf}" if owner in prefixes else key] = value
    wrapped.update(stored)
    arch = infer_arch({plain_key(k): v for k, v in wrapped.items() if ".lora_" not in k})
    if arch is None:
        raise CheckpointError(f"{source}: the base and stored weights together are not a complete SAM")
    with torch.device("meta"):
        sam = build_sam_from_arch(arch)
    apply_lora(sam, merged["lora"])
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(wrapped))
    unexpected = sorted(set(wrapped) - set(expected))
    shapes = [k for k in expected if k in wrapped and wrapped[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: LoRA settings {dict(merged['lora'])} do not fit its weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatches {shapes[:3]}); pass the run's finetune.lora settings."
        )
    sam.load_state_dict(wrapped, assign=True)
    return {k: v.detach() for k, v in plain_state_dict(sam).items()}
