"""SAM split into its expensive and its cheap step, for training and evaluation alike.

``Sam.forward`` runs under ``torch.no_grad()``, so samtune never calls it: like
``SamPredictor``, :class:`PromptableSam` embeds an image once (:meth:`embed`) and decodes any
number of prompts against that embedding in one batched call (:meth:`decode`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.utils.checkpoint import checkpoint

from samtune.data.transforms import normalize_and_pad, resize_longest_side


class PromptableSam(nn.Module):
    """A :class:`Sam` with SamPredictor's split between image embedding and prompt decoding.

    Args:
        sam: The segment_anything model whose components are called directly.
        gradient_checkpointing: Recompute each ViT block's activations in the backward pass instead
            of storing them (``torch.utils.checkpoint``), when the encoder runs with gradients.
    """

    def __init__(self, sam: Sam, *, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution logits (4x the embedding grid, 256 for SAM)."""
        return 4 * self.sam.prompt_encoder.image_embedding_size[0]

    # ------------------------------------------------------------------ preprocessing
    def prepare_image(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Resize, normalise and pad one image exactly as ``SamPredictor.set_image`` does.

        Args:
            image: H x W x 3 uint8 RGB.

        Returns:
            (1 x 3 x S x S float tensor on the model's device, input size (h, w) before padding,
            original size (H, W)).
        """
        resized = resize_longest_side(image, self.img_size)
        x = normalize_and_pad(resized, self.img_size).unsqueeze(0).to(self.device)
        return x, (int(resized.shape[0]), int(resized.shape[1])), (int(image.shape[0]), int(image.shape[1]))

    def coords_to_input(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map ... x 2 XY pixel coordinates of the original image into the model's input frame."""
        return self.transform.apply_coords_torch(coords, original_size)

    def boxes_to_input(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map N x 4 XYXY boxes of the original image into the model's input frame."""
        return self.transform.apply_boxes_torch(boxes, original_size)

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    # ------------------------------------------------------------------ the two steps
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image encoder. ``images``: B x 3 x S x S normalised and padded -> B x C x S/16 x S/16."""
        encoder = self.sam.image_encoder
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return encoder(images)
        # ImageEncoderViT.forward, with each block's activations recomputed during backward.
        x = encoder.patch_embed(images)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return encoder.neck(x.permute(0, 3, 1, 2))

    def decode(
        self,
        embedding: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts against one image embedding in a single call.

        Args:
            embedding: 1 x C x h x w embedding of one image.
            points: (coords N x K x 2 XY in the input frame, labels N x K; 1 positive, 0 negative,
                -1 padding).
            boxes: N x 4 XYXY in the input frame.
            mask_input: N x 1 x 4h x 4w low-resolution logits of a previous round.

        Returns:
            (logits N x 4 x 4h x 4w, predicted IoU N x 4). Output 0 is SAM's single-mask output (for
            unambiguous prompts), outputs 1..3 the multimask outputs (for a single point).
        """
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.sam.mask_decoder.predict_masks(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )

    @staticmethod
    def select_output(logits: torch.Tensor, iou: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one mask per prompt as SAM recommends.

        Single-mask output 0 for unambiguous prompts; for ambiguous ones the multimask output with
        the highest predicted IoU.

        Args:
            logits: N x 4 x h x w.
            iou: N x 4.
            multimask: whether the prompts are ambiguous (one point, no box).

        Returns:
            (logits N x 1 x h x w, predicted IoU N).
        """
        if not multimask:
            return logits[:, :1], iou[:, 0]
        best = iou[:, 1:].argmax(dim=1) + 1
        rows = torch.arange(len(logits), device=logits.device)
        return logits[rows, best].unsqueeze(1), iou[rows, best]

    def postprocess(self, logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits N x C x h x w -> logits N x C x H x W at the original size."""
        return self.sam.postprocess_masks(logits, input_size, original_size)

    def upscale_to_input(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits N x C x h x w -> N x C x S x S in the (padded) input frame."""
        return F.interpolate(logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
