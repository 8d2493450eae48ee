"""LoRA on the attention projections of SAM's image encoder, through peft.

segment_anything's ``Attention`` computes queries, keys and values with one ``qkv`` Linear and
projects the heads back with ``proj``. :func:`apply_lora` lets peft wrap the chosen Linears of the
chosen ViT blocks in place (``inject_adapter_in_model``): the base weights stay frozen, peft adds
``lora_A`` (random) and ``lora_B`` (zeros), so a freshly wrapped model gives exactly the base
model's outputs. While wrapped, the state dict has peft's keys
(``...attn.qkv.base_layer.weight``, ``...attn.qkv.lora_A.default.weight``).

:func:`plain_state_dict` and :func:`merge_lora` fold ``W + scaling * B @ A`` back into the base
weights with peft's own arithmetic, giving the official segment_anything keys again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from segment_anything.modeling import Sam

ATTENTION_LINEARS = ("qkv", "proj")


@dataclass(frozen=True)
class LoraSettings:
    """What ``finetune.lora`` configures.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the LoRA branch's input during training.
        blocks: ``"all"`` or the indices of the ViT blocks to adapt (0 = first block).
        target_modules: Attention Linears to adapt: ``qkv`` and/or ``proj``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    blocks: str | tuple[int, ...] = "all"
    target_modules: tuple[str, ...] = ("qkv",)

    @classmethod
    def from_config(cls, cfg: LoraSettings | Mapping | None) -> LoraSettings:
        """Validate a ``finetune.lora`` mapping (or pass settings through); errors name the key."""
        if isinstance(cfg, LoraSettings):
            return cfg
        values = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"finetune.lora: unknown keys {unknown}; valid: {sorted(names)}")
        blocks = values.get("blocks", "all")
        if isinstance(blocks, str):
            if blocks != "all":
                raise ValueError(f"finetune.lora.blocks must be 'all' or a list of block indices, got {blocks!r}")
        else:
            blocks = tuple(int(b) for b in blocks)
            if not blocks:
                raise ValueError("finetune.lora.blocks is an empty list: no block would be adapted")
        targets = values.get("target_modules", ("qkv",))
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        bad = [t for t in targets if t not in ATTENTION_LINEARS]
        if bad or not targets:
            raise ValueError(f"finetune.lora.target_modules {list(targets)}: choose from {list(ATTENTION_LINEARS)}")
        settings = cls(
            rank=int(values.get("rank", cls.rank)), alpha=float(values.get("alpha", cls.alpha)),
            dropout=float(values.get("dropout", cls.dropout)), blocks=blocks, target_modules=targets,
        )
        if settings.rank < 1:
            raise ValueError(f"finetune.lora.rank must be >= 1, got {settings.rank}")
        if not 0 <= settings.dropout < 1:
            raise ValueError(f"finetune.lora.dropout must be in [0, 1), got {settings.dropout}")
        return settings

    def to_dict(self) -> dict:
        """Plain, YAML/JSON-friendly form (stored in training checkpoints)."""
        blocks = self.blocks if isinstance(self.blocks, str) else list(self.blocks)
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "blocks": blocks,
                "target_modules": list(self.target_modules)}


def has_lora(module: torch.nn.Module) -> bool:
    """Whether any LoRA layer is injected in ``module``."""
    return any(isinstance(m, LoraLayer) for m in module.modules())


def apply_lora(sam: Sam, cfg: LoraSettings | Mapping | None = None) -> Sam:
    """Inject LoRA adapters into the image encoder of ``sam``, in place.

    Every parameter of the image encoder except the LoRA matrices is frozen; the prompt encoder and
    the mask decoder are left as they are (the training module decides whether they train).

    Args:
        sam: The model to adapt.
        cfg: :class:`LoraSettings` or a ``finetune.lora`` mapping.

    Returns:
        ``sam`` itself.

    Raises:
        ValueError: invalid settings, block indices outside the encoder, or LoRA already applied.
    """
    settings = LoraSettings.from_config(cfg)
    encoder = sam.image_encoder
    if has_lora(encoder):
        raise ValueError("apply_lora: the image encoder already has LoRA adapters")
    depth = len(encoder.blocks)
    blocks = tuple(range(depth)) if settings.blocks == "all" else settings.blocks
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"finetune.lora.blocks {bad} outside 0..{depth - 1} (the encoder has {depth} blocks)")
    pattern = rf"blocks\.({'|'.join(str(b) for b in sorted(set(blocks)))})\.attn\.({'|'.join(settings.target_modules)})"
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=pattern, bias="none",
    )
    encoder.requires_grad_(False)
    inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_(".lora_" in name)
    return sam


def _lora_layers(module: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def plain_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """``sam``'s weights with LoRA folded in, under segment_anything's keys; ``sam`` is not changed.

    Without LoRA this is ``sam.state_dict()``. With LoRA each wrapped Linear contributes
    ``base weight + peft's delta weight`` as ``<name>.weight`` (and its bias as ``<name>.bias``);
    the ``lora_*`` tensors are dropped. Bitwise equal to the weights after :func:`merge_lora`.
    """
    state = sam.state_dict()
    layers = _lora_layers(sam)
    if not layers:
        return state
    merged: dict[str, torch.Tensor] = {}
    lora_keys: set[str] = set()
    for name, layer in layers:
        weight = layer.get_base_layer().weight.detach()
        if not layer.merged:
            with torch.no_grad():
                for adapter in layer.active_adapters:
                    weight = weight + layer.get_delta_weight(adapter)
        merged[f"{name}.base_layer.weight"] = weight
        lora_keys.update(k for k in state if k.startswith(f"{name}.lora_"))
    out = {}
    for key, value in state.items():
        if key in lora_keys:
            continue
        value = merged.get(key, value)
        out[key.replace(".base_layer.", ".")] = value
    return out


def merge_lora(sam: Sam) -> Sam:
    """Fold the LoRA adapters into the base weights and remove peft's wrappers, in place.

    Afterwards ``sam`` is a plain segment_anything :class:`Sam` whose state dict has exactly the
    official keys (loadable by ``sam_model_registry[...]``). A model without LoRA is returned as is.
    """
    for name, layer in _lora_layers(sam):
        if not layer.merged:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = sam.get_submodule(parent_name) if parent_name else sam
        setattr(parent, child, layer.get_base_layer())
    for module in sam.modules():
        if hasattr(module, "peft_config"):
            del module.peft_config
    return sam
