"""Fine-tune modes (``finetune.mode``): what each one does to the image encoder, and what follows from it.

Code that depends on the mode asks its :class:`FinetuneMode` (``finetune_mode(cfg.finetune.mode)``) instead of
comparing names: whether the encoder runs with gradients, whether its embeddings can be cached, whether adapters
are merged at the end, whether the data engine's EMA teacher can share it. A new mode is one entry of
:data:`MODES` (plus its ``configs/finetune/<name>.yaml``, which starts from ``configs/finetune/base.yaml``).
Presets that only restrict what trains (``finetune=iou_head``: ``decoder_only`` with ``only``) are configs, not modes.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER_STATES = ("frozen", "adapters", "trained")


@dataclass(frozen=True)
class FinetuneMode:
    """One ``finetune.mode``.

    Attributes:
        name: The config value.
        encoder: ``frozen`` (runs without gradients), ``adapters`` (LoRA adapters train on it, its base weights
            stay frozen; merged into them at the end) or ``trained`` (all its weights train).
        summary: One line for logs and errors.
    """

    name: str
    encoder: str
    summary: str

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_STATES:
            raise ValueError(f"FinetuneMode {self.name}: encoder must be one of {ENCODER_STATES}, got {self.encoder!r}")

    @property
    def encoder_frozen(self) -> bool:
        """The image encoder never changes: its embeddings can be cached and shared (the engine's EMA teacher)."""
        return self.encoder == "frozen"

    @property
    def encoder_weights_train(self) -> bool:
        """Every weight of the image encoder trains."""
        return self.encoder == "trained"

    @property
    def uses_adapters(self) -> bool:
        """LoRA adapters train on the encoder (``finetune.lora``) and are merged into it at the end."""
        return self.encoder == "adapters"


MODES: dict[str, FinetuneMode] = {m.name: m for m in (
    FinetuneMode("decoder_only", "frozen", "image encoder frozen, mask decoder (and optionally prompt encoder) trained"),
    FinetuneMode("lora", "adapters", "LoRA adapters on the image encoder's attention, mask decoder trained"),
    FinetuneMode("full", "trained", "everything trains: image encoder, prompt encoder, mask decoder"),
)}


def finetune_mode(name: str | FinetuneMode | None) -> FinetuneMode:
    """The mode called ``name`` (None: ``decoder_only``, the default of ``train.py``)."""
    if isinstance(name, FinetuneMode):
        return name
    key = "decoder_only" if name is None else str(name)
    if key not in MODES:
        raise ValueError(f"finetune.mode={key!r} is not one of {list(MODES)}")
    return MODES[key]
