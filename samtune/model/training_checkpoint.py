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
