"""Prompts: pure sampling functions, the training-time simulator and fixed evaluation prompts."""

from samtune.prompts.eval_prompts import load_prompts, make_instance_prompts, save_prompts
from samtune.prompts.sampling import (
    center_points,
    jitter_boxes,
    largest_error_click,
    masks_to_boxes,
    sample_correction_clicks,
    sample_negative_points,
    sample_points_in_masks,
)
from samtune.prompts.simulator import PromptGroup, PromptPolicy, PromptSimulator

__all__ = [
    "PromptGroup",
    "PromptPolicy",
    "PromptSimulator",
    "center_points",
    "jitter_boxes",
    "largest_error_click",
    "load_prompts",
    "make_instance_prompts",
    "masks_to_boxes",
    "sample_correction_clicks",
    "sample_negative_points",
    "sample_points_in_masks",
    "save_prompts",
]
