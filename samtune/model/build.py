"""Build SAM models from segment_anything's own modeling classes.

``vit_b``, ``vit_l`` and ``vit_h`` are the official architectures (1024 px input). ``sam_tiny`` is
the same architecture, narrower and shallower, with a 256 px input, so that it trains on a CPU.
Every architecture is described by a :class:`SamArch`; a state dict alone is enough to recover the
architecture it was saved from (:func:`infer_arch`), which is how a checkpoint that does not fit the
chosen model gets an error that names the model it does belong to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samtune.data.transforms import PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class SamArch:
    """Hyper-parameters of one SAM architecture.

    Attributes:
        img_size: Side of the square model input in pixels (longest image side is resized to it).
        encoder_embed_dim: ViT width.
        encoder_depth: Number of ViT blocks.
        encoder_num_heads: Attention heads per ViT block.
        encoder_global_attn_indexes: Blocks that use global instead of windowed attention.
        window_size: Side of the attention windows, in patches.
        patch_size: ViT patch side in pixels.
        prompt_embed_dim: Width of the prompt encoder and mask decoder (256 in SAM).
        decoder_mlp_dim: Hidden width of the decoder transformer's MLPs.
        decoder_depth: Blocks of the decoder's two-way transformer.
        decoder_num_heads: Attention heads in the decoder.
        iou_head_hidden_dim: Hidden width of the IoU prediction head.
    """

    img_size: int = 1024
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        return (
            f"img_size={self.img_size}, embed_dim={self.encoder_embed_dim}, depth={self.encoder_depth}, "
            f"heads={self.encoder_num_heads}, global_attn={list(self.encoder_global_attn_indexes)}, "
            f"window={self.window_size}, decoder_mlp_dim={self.decoder_mlp_dim}"
        )


ARCHITECTURES: dict[str, SamArch] = {
    "vit_b": SamArch(),
    "vit_l": SamArch(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamArch(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    "sam_tiny": SamArch(
        img_size=256, encoder_embed_dim=160, encoder_depth=6, encoder_num_heads=5,
        encoder_global_attn_indexes=(2, 5), window_size=8, decoder_mlp_dim=1024,
    ),
}

OFFICIAL_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
CHECKPOINT_HELP = (
    "Official SAM checkpoints are published by Meta in the segment-anything repository "
    "(https://github.com/facebookresearch/segment-anything#model-checkpoints), e.g. "
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth for vit_b."
)


def resolve_arch(model_type: str, overrides: dict | None = None) -> SamArch:
    """Return the architecture of ``model_type`` with optional field overrides.

    Raises:
        ValueError: unknown model type or override key (naming ``model.type`` / ``model.arch.<key>``).
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model.type={model_type!r} is not one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    overrides = dict(overrides or {})
    if not overrides:
        return arch
    names = {f.name for f in dataclasses.fields(SamArch)} - {"extra"}
    for key in overrides:
        if key not in names:
            raise ValueError(f"model.arch.{key} is not an architecture field; valid: {sorted(names)}")
    if "encoder_global_attn_indexes" in overrides:
        overrides["encoder_global_attn_indexes"] = tuple(overrides["encoder_global_attn_indexes"])
    return dataclasses.replace(arch, **overrides)


def build_sam_from_arch(arch: SamArch) -> Sam:
    """Instantiate an untrained :class:`Sam` with segment_anything's modeling classes."""
    if arch.img_size % arch.patch_size:
        raise ValueError(f"model.arch.img_size={arch.img_size} must be a multiple of patch_size={arch.patch_size}")
    if arch.encoder_embed_dim % arch.encoder_num_heads:
        raise ValueError(
            f"model.arch.encoder_embed_dim={arch.encoder_embed_dim} must be divisible by "
            f"encoder_num_heads={arch.encoder_num_heads}"
        )
    bad = [i for i in arch.encoder_global_attn_indexes if not 0 <= i < arch.encoder_depth]
    if bad:
        raise ValueError(f"model.arch.encoder_global_attn_indexes {bad} outside 0..{arch.encoder_depth - 1}")
    grid = arch.img_size // arch.patch_size
    dim = arch.prompt_embed_dim
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch.encoder_global_attn_indexes),
            window_size=arch.window_size,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def build_seeded_sam(arch: SamArch, seed: int) -> Sam:
    """:func:`build_sam_from_arch` with its random initialisation drawn from ``seed``.

    The global RNG is left untouched, so the same ``(arch, seed)`` always gives the same weights: this
    is how a training checkpoint of a randomly initialised ``sam_tiny`` recovers its frozen weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam_from_arch(arch)


def infer_arch(state_dict: dict[str, torch.Tensor]) -> SamArch | None:
    """Recover the architecture a SAM state dict was saved from, or None if it is not SAM's.

    Every field is read from tensor shapes: width from the patch embedding, input size from the
    absolute position embedding, depth from the block count, heads and window size from the
    relative position tables, decoder widths from the decoder's linear layers.
    """
    try:
        proj = state_dict["image_encoder.patch_embed.proj.weight"]
        pos = state_dict["image_encoder.pos_embed"]
        embed_dim, _, patch, _ = proj.shape
        grid = pos.shape[1]
        blocks = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")})
        depth = len(blocks)
        head_dim = state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        global_idx, window = [], 0
        for i in blocks:
            span = (state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2
            if span == grid:
                global_idx.append(i)
            else:
                window = span
        prompt_dim = state_dict["mask_decoder.iou_token.weight"].shape[1]
        mlp_dim = state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        dec_layers = {int(k.split(".")[3]) for k in state_dict if k.startswith("mask_decoder.transformer.layers.")}
        iou_hidden = state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
    except (KeyError, IndexError, AttributeError, ValueError):
        return None
    return SamArch(
        img_size=int(grid * patch),
        encoder_embed_dim=int(embed_dim),
        encoder_depth=depth,
        encoder_num_heads=int(embed_dim // head_dim),
        encoder_global_attn_indexes=tuple(global_idx),
        window_size=int(window) if window else 14,
        patch_size=int(patch),
        prompt_embed_dim=int(prompt_dim),
        decoder_mlp_dim=int(mlp_dim),
        decoder_depth=len(dec_layers),
        iou_head_hidden_dim=int(iou_hidden),
    )


def name_arch(arch: SamArch) -> str | None:
    """Name of the registered architecture equal to ``arch`` (ignoring window size for global-only)."""
    for name, known in ARCHITECTURES.items():
        if known == arch:
            return name
    return None
