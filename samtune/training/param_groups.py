"""Optimizer parameter groups: encoder learning-rate multiplier, layer-wise decay, no weight decay
on norms, biases and position embeddings.

Learning rate of each trainable parameter, with ``base_lr`` the optimizer's ``lr`` and ``depth`` the
number of ViT blocks (blocks numbered from 0):

* prompt encoder and mask decoder: ``base_lr``, the mask decoder's IoU head ``base_lr * iou_head_lr_mult``;
* image encoder block ``i``: ``base_lr * encoder_lr_mult * layer_decay ** (depth - i)``;
* patch embedding and absolute position embedding (below block 0): ``... * layer_decay ** (depth + 1)``;
* neck (after the last block): like the last block, ``... * layer_decay ** 1``.

With ``layer_decay=1`` and ``encoder_lr_mult=1`` every parameter gets ``base_lr``. LoRA matrices
sit inside the blocks and follow the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ENCODER = "image_encoder."
IOU_HEAD = "mask_decoder.iou_prediction_head."
IOU_HEAD_GROUP = IOU_HEAD[:-1]  # its param groups' name (with ".no_wd" for those without weight decay)
NO_DECAY_NAMES = ("pos_embed", "rel_pos_h", "rel_pos_w")


def encoder_layer(name: str, depth: int) -> int | None:
    """Depth-from-the-top of an image encoder parameter (1 = last block / neck), None outside the encoder."""
    if not name.startswith(ENCODER):
        return None
    rest = name[len(ENCODER):]
    if rest.startswith("blocks."):
        return depth - int(rest.split(".")[1])
    if rest.startswith(("patch_embed.", "pos_embed")):
        return depth + 1
    return 1


def lr_scale(name: str, *, depth: int, encoder_lr_mult: float = 1.0, layer_decay: float = 1.0,
             iou_head_lr_mult: float = 1.0) -> float:
    """Factor on the base learning rate of the parameter called ``name`` (a :class:`Sam` parameter name)."""
    layer = encoder_layer(name, depth)
    if layer is None:
        return iou_head_lr_mult if name.startswith(IOU_HEAD) else 1.0
    return encoder_lr_mult * layer_decay**layer


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """No weight decay on biases, norm weights (1-D tensors) and position embeddings."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(part in NO_DECAY_NAMES for part in name.split("."))


def _group_name(name: str, depth: int, own_iou_head: bool = False) -> str:
    layer = encoder_layer(name, depth)
    if layer is None:
        return IOU_HEAD_GROUP if own_iou_head and name.startswith(IOU_HEAD) else name.split(".")[0]
    rest = name[len(ENCODER):]
    if rest.startswith("blocks."):
        return f"image_encoder.block{rest.split('.')[1]}"
    return "image_encoder.embed" if layer == depth + 1 else "image_encoder.neck"


def restrict_trainable(sam: torch.nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Freeze every trainable parameter of ``sam`` whose name starts with none of ``prefixes``
    (``finetune.only``); return the names that still train.

    Raises:
        ValueError: A prefix names no trainable parameter (a typo, or a part the mode freezes).
    """
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    prefixes = [str(p).strip().rstrip(".") for p in prefixes]
    trainable = [n for n, p in sam.named_parameters() if p.requires_grad]
    kept = []
    for prefix in prefixes:
        hits = [n for n in trainable if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            parts = sorted({".".join(n.split(".")[:2]) for n in trainable})
            raise ValueError(
                f"finetune.only: {prefix!r} matches no parameter that finetune.mode trains; trainable modules "
                f"are {parts}")
        kept.extend(hits)
    for name, param in sam.named_parameters():
        if param.requires_grad and name not in kept:
            param.requires_grad_(False)
    return sorted(set(kept))


def reinitialise(sam: torch.nn.Module, prefixes: Iterable[str], seed: int = 0) -> list[str]:
    """Give the submodules of ``sam`` named by ``prefixes`` fresh weights (their own ``reset_parameters``,
    seeded), e.g. an IoU head whose ReLU units died in pre-training (``finetune.reinit``); return the names
    of the re-initialised parameters.

    Raises:
        ValueError: A prefix names no submodule of ``sam``, or a submodule that has nothing to reset.
    """
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    modules = dict(sam.named_modules())
    names = []
    for prefix in (str(p).strip().rstrip(".") for p in prefixes):
        if prefix not in modules:
            parents = sorted({n.rsplit(".", 1)[0] for n in modules if n.count(".") == 1})
            raise ValueError(f"finetune.reinit: {prefix!r} is not a submodule of SAM (e.g. one of {parents})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resettable = [m for m in modules[prefix].modules() if hasattr(m, "reset_parameters")]
            if not resettable:
                raise ValueError(f"finetune.reinit: {prefix!r} has no layer with parameters to re-initialise")
            for m in resettable:
                m.reset_parameters()
        names += [f"{prefix}.{n}" for n, _ in modules[prefix].named_parameters()]
    return names


def build_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    depth: int,
    encoder_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
    iou_head_lr_mult: float = 1.0,
) -> list[dict]:
    """Group the trainable parameters of a :class:`Sam` by learning-rate factor and weight decay.

    Args:
        named_parameters: ``sam.named_parameters()`` (names relative to the :class:`Sam`); frozen
            parameters are skipped.
        depth: Number of ViT blocks of the image encoder.
        encoder_lr_mult: Factor on the image encoder's learning rate (``finetune.encoder_lr_mult``).
        layer_decay: Layer-wise decay per block below the top (``finetune.layer_decay``), in (0, 1].
        iou_head_lr_mult: Factor on the learning rate of the mask decoder's IoU head (``finetune.iou_head_lr_mult``).

    Returns:
        Param groups for a ``torch.optim`` optimizer, each with ``params``, ``name`` and
        ``lr_scale`` (multiply the group's learning rate by it once the optimizer exists, see
        :func:`apply_lr_scales`); groups without weight decay carry ``weight_decay=0.0``, the
        others take the optimizer's default.
    """
    if encoder_lr_mult < 0:
        raise ValueError(f"finetune.encoder_lr_mult must be >= 0, got {encoder_lr_mult}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"finetune.layer_decay must be in (0, 1], got {layer_decay}")
    if not iou_head_lr_mult > 0:
        raise ValueError(f"finetune.iou_head_lr_mult must be > 0, got {iou_head_lr_mult}")
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        decay = uses_weight_decay(name, param)
        # the IoU head gets groups of its own only when its rate differs: the same groups as before otherwise, so
        # that runs saved without the option resume (an optimizer state must match the group layout)
        key = (_group_name(name, depth, own_iou_head=iou_head_lr_mult != 1.0), decay)
        if key not in groups:
            scale = lr_scale(name, depth=depth, encoder_lr_mult=encoder_lr_mult, layer_decay=layer_decay,
                             iou_head_lr_mult=iou_head_lr_mult)
            groups[key] = {"params": [], "name": key[0] if decay else f"{key[0]}.no_wd", "lr_scale": scale}
            if not decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(param)
    return list(groups.values())


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each param group's learning rate by its ``lr_scale`` (before a scheduler is attached)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
