"""SAM models: architectures, checkpoint loading and the embed/decode wrapper."""

from samtune.model.build import ARCHITECTURES, SamArch, build_sam_from_arch, infer_arch, resolve_arch
from samtune.model.checkpoint import CheckpointError, load_sam_weights, read_state_dict, save_sam_weights
from samtune.model.factory import build_model
from samtune.model.promptable_sam import PromptableSam

__all__ = [
    "ARCHITECTURES", "CheckpointError", "PromptableSam", "SamArch", "build_model", "build_sam_from_arch",
    "infer_arch", "load_sam_weights", "read_state_dict", "resolve_arch", "save_sam_weights",
]
