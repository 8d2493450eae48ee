"""All prompts of an image go through the prompt encoder and mask decoder in one call per prompt group and round."""

from __future__ import annotations

import functools

import pytest
import torch

from samtune.losses import SamLoss
from samtune.model import build_model
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.module import SamTuneModule

pytestmark = [pytest.mark.filterwarnings("ignore:You are trying to `self.log"), pytest.mark.usefixtures("one_thread")]

IMAGES, INSTANCES = 2, 6



def batch() -> dict:
    masks = torch.zeros(IMAGES, INSTANCES, 256, 256, dtype=torch.bool)
    for b in range(IMAGES):
        for k in range(INSTANCES):
            y, x = 20 + 70 * (k // 3), 20 + 75 * (k % 3) + 5 * b
            masks[b, k, y : y + 40, x : x + 30 + 4 * k] = True
    return {"image": torch.randn(IMAGES, 3, 256, 256, generator=torch.Generator().manual_seed(0)), "masks": masks,
            "valid": torch.ones(IMAGES, INSTANCES, dtype=torch.bool),
            "input_size": torch.tensor([[256, 256]] * IMAGES), "original_size": torch.tensor([[256, 256]] * IMAGES)}


def record_decoder_calls(module: SamTuneModule) -> list[int]:
    """Prompts per call of the mask decoder (its two-way transformer runs once per ``predict_masks`` call)."""
    calls: list[int] = []
    module.model.sam.mask_decoder.transformer.register_forward_hook(lambda _m, _i, out: calls.append(len(out[0])))
    return calls


@pytest.mark.parametrize("box_prob", [0.0, 0.5, 1.0])
def test_training_step_decodes_each_prompt_group_in_one_call_per_round(box_prob):
    policy = PromptPolicy(box_prob=box_prob, correction_rounds=2, mask_only_rounds=1)
    module = SamTuneModule(build_model("sam_tiny", seed=0), simulator=PromptSimulator(policy), loss=SamLoss(),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mode="decoder_only", seed=int(10 * box_prob))
    calls = record_decoder_calls(module)
    loss = module.training_step(batch(), 0)
    loss.backward()
    rounds = 1 + policy.correction_rounds + policy.mask_only_rounds
    # every instance is decoded once per round ...
    assert sum(calls) == IMAGES * INSTANCES * rounds
    # ... in at most one call per prompt group (box / points layout) per image and round, never one per prompt
    groups_per_image = 1 if box_prob in (0.0, 1.0) else 2
    assert len(calls) <= IMAGES * groups_per_image * rounds
    assert len(calls) < IMAGES * INSTANCES * rounds and max(calls) > 1


def test_validation_step_decodes_each_prompt_mode_in_one_call_per_image():
    module = SamTuneModule(build_model("sam_tiny", seed=0), simulator=PromptSimulator(PromptPolicy()), loss=SamLoss(),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mode="decoder_only")
    calls = record_decoder_calls(module)
    with torch.no_grad():
        module.validation_step(batch(), 0)
    assert calls == [INSTANCES] * (IMAGES * 2)  # box and point1, all instances of an image at once
