"""How many images (zoom crops) the image encoder may embed in one call, from the model and the memory at hand.

SAM's ViT materialises its attention maps: a block with global attention over the 64 x 64 patch grid of a
1024 px input holds ``heads x 4096 x 4096`` floats per image (vit_b: 0.8 GB), and segment_anything's
relative-position step adds two more maps of that size before the softmax. Embedding 16 zoom crops in one
call (the fixed batch of earlier versions, harmless for ``sam_tiny``'s 16 x 16 grid) thus needs some 40 GB for
vit_b. :func:`crops_per_call` divides a memory budget (``eval.memory_budget_gb``, or a share of the memory
available on the model's device) by an estimate of what one crop costs (:func:`encoder_activation_bytes`,
computed from the encoder's own modules, plus the crop's input, embedding and image-size masks), between 1 and
:data:`MAX_CROPS`. The number of crops per call changes only how crops are batched, never a mask.
"""

from __future__ import annotations

import math

import torch

MAX_CROPS = 16  # crops per encoder call at most (the fixed batch before; sam_tiny keeps it)
CPU_SHARE = 0.25  # of the available RAM (shared with every other process on the host; a CPU gains nothing from batching)
CUDA_SHARE = 0.7  # of the free GPU memory (the device is the process's own; batching is what makes a GPU fast)
MASK_BYTES_PER_PIXEL = 12  # per crop at the full image size: float32 logits where a prompt is decoded on the whole
# image (a point's first answer with eval.zoom_whole_first) and their thresholded temporaries, the pasted mask, the
# ground truth it is scored against and that comparison's temporaries (bool)


def _dtype_bytes(module: torch.nn.Module) -> int:
    """Bytes of an activation: those of the weights (float32: 4; under autocast activations are smaller)."""
    param = next(module.parameters(), None)
    return 4 if param is None or not param.is_floating_point() else param.element_size()


def encoder_activation_bytes(encoder: torch.nn.Module, *, grad: bool = False) -> int:
    """Activation memory of one image through segment_anything's ``ImageEncoderViT``, in bytes.

    Read from the encoder itself: input size and patch size (the token grid), embedding width, every block's
    heads, window size (0: global attention), relative-position terms and MLP width.

    Without autograd (evaluation, inference) the blocks run one after the other and the peak is that of the
    costliest block, a global-attention one at 1024 px: the attention map (``heads x tokens^2``) is held up to
    three times with relative positions (the map, the map plus the row terms, plus the column terms; two
    without them: map and softmax), beside the block's token tensors (input, shortcut, q/k/v, output; or the
    MLP's hidden layer). With ``grad`` every block keeps what its backward pass needs (a softmax output and its
    token tensors), so the depth adds up.

    Args:
        encoder: An ``ImageEncoderViT`` (``model.sam.image_encoder``).
        grad: Estimate for a forward pass that records autograd (no gradient checkpointing).
    """
    img = int(encoder.img_size)
    proj = encoder.patch_embed.proj
    grid = img // int(proj.stride[0])
    dim = int(proj.out_channels)
    n = grid * grid
    peak = kept = 0
    for block in encoder.blocks:
        attn = block.attn
        heads = int(attn.num_heads)
        window = int(block.window_size)
        if window > 0:
            side = window
            padded = math.ceil(grid / window) * window
            groups = (padded // window) ** 2
        else:
            side, groups = grid, 1
        tokens = side * side
        seq = groups * tokens  # padded tokens
        attn_map = groups * heads * tokens * tokens
        rel = bool(getattr(attn, "use_rel_pos", False))
        maps = 3 if rel else 2
        rel_terms = 2 * groups * heads * tokens * side if rel else 0  # rel_h, rel_w
        hidden = int(block.mlp.lin1.out_features)
        attention_phase = maps * attn_map + rel_terms + 6 * seq * dim + 2 * n * dim  # qkv (3), q*scale, attn@v, proj
        mlp_phase = 2 * n * hidden + 3 * n * dim
        peak = max(peak, attention_phase, mlp_phase)
        kept += attn_map + rel_terms + 6 * seq * dim + 2 * n * hidden if grad else 0
    neck = int(encoder.neck[0].out_channels) * n * 3
    return (kept + max(peak, neck) + 3 * img * img) * _dtype_bytes(encoder)


def crop_bytes(model, image_size: tuple[int, int]) -> int:
    """What one crop embedded with others costs: the encoder's activations (:func:`encoder_activation_bytes`),
    its input and embedding (kept for the decoder until the call's crops are decoded), and its masks at the image
    size ``(H, W)``."""
    encoder = model.sam.image_encoder
    grid = int(encoder.img_size) // int(encoder.patch_embed.proj.stride[0])
    kept = (3 * int(encoder.img_size) ** 2 + int(encoder.neck[0].out_channels) * grid * grid) * _dtype_bytes(encoder)
    h, w = image_size
    return encoder_activation_bytes(encoder) + kept + MASK_BYTES_PER_PIXEL * int(h) * int(w)


def available_bytes(device: torch.device | str) -> int:
    """Memory the crops of one call may use when no budget is set: :data:`CUDA_SHARE` of the free GPU memory
    (``torch.cuda.mem_get_info``, plus what PyTorch's allocator holds unused), or :data:`CPU_SHARE` of the
    available RAM (``psutil``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_SHARE * free)
    import psutil

    return int(CPU_SHARE * psutil.virtual_memory().available)


def crops_per_call(model, image_size: tuple[int, int], budget_gb: float | None = None) -> int:
    """Crops to embed per encoder call: the budget (``budget_gb`` GB, else :func:`available_bytes` of the
    model's device) over :func:`crop_bytes`, at least 1 and at most :data:`MAX_CROPS`."""
    budget = available_bytes(model.device) if budget_gb is None else float(budget_gb) * 1e9
    return int(max(1, min(MAX_CROPS, budget // crop_bytes(model, image_size))))
