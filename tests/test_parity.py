"""samtune's evaluation path gives SamPredictor's masks and IoUs for the same weights, image and prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from samtune.evaluation.evaluator import predict_prompts
from samtune.model import build_model, save_sam_weights


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = (250, 30, 30)
    return img


PROMPTS = [
    {"instance": 1, "box": [40, 30, 120, 90], "point1": {"points": [[70, 55]], "labels": [1]},
     "point3": {"points": [[70, 55], [90, 60], [10, 10]], "labels": [1, 1, 0]}},
    {"instance": 2, "box": [5, 100, 60, 150], "point1": {"points": [[30, 120]], "labels": [1]},
     "point3": {"points": [[30, 120], [40, 130], [150, 40]], "labels": [1, 1, 0]}},
]


def _compare(sam, predictor: SamPredictor, model, image: np.ndarray) -> None:
    x, input_size, original_size = model.prepare_image(image)
    assert input_size == tuple(predictor.input_size) and original_size == tuple(predictor.original_size)
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(x, sam.preprocess(resized), atol=0, rtol=0)  # same pixels into the encoder
    for a, b in zip(model.sam.state_dict().values(), sam.state_dict().values()):
        assert torch.equal(a, b)  # same weights
    embedding = predictor.features  # the encoder ran once, inside SamPredictor.set_image ...
    ours = model.embed(x) if model.img_size <= 256 else None
    if ours is not None:  # ... and, for the small model, once more from samtune's own preprocessing
        torch.testing.assert_close(ours, embedding, atol=1e-5, rtol=1e-4)
    for mode in ("box", "point1", "point3"):
        (_, masks, pred_iou), = list(
            predict_prompts(model, embedding, PROMPTS[:1], mode, input_size=input_size, original_size=original_size)
        )
        p = PROMPTS[0]
        if mode == "box":
            ref_masks, ref_iou, _ = predictor.predict(box=np.array(p["box"]), multimask_output=False)
            ref_mask, ref_score = ref_masks[0], ref_iou[0]
        else:
            ref_masks, ref_iou, _ = predictor.predict(
                point_coords=np.array(p[mode]["points"]), point_labels=np.array(p[mode]["labels"]),
                multimask_output=mode == "point1",
            )
            best = int(np.argmax(ref_iou))
            ref_mask, ref_score = ref_masks[best], ref_iou[best]
        assert np.array_equal(masks[0].numpy(), ref_mask), mode
        assert abs(float(pred_iou[0]) - float(ref_score)) < 1e-5, mode
    # Batched decoding of several prompts equals decoding them one at a time.
    for mode in ("box", "point3"):
        (_, batched, biou), = list(predict_prompts(model, embedding, PROMPTS, mode, input_size=input_size,
                                                   original_size=original_size))
        for i in range(len(PROMPTS)):
            (_, single, siou), = list(predict_prompts(model, embedding, PROMPTS[i : i + 1], mode,
                                                      input_size=input_size, original_size=original_size))
            assert (batched[i] != single[0]).float().mean() < 1e-3
            assert abs(float(biou[i]) - float(siou[0])) < 1e-4


def test_parity_with_sam_predictor_sam_tiny(tmp_path):
    model = build_model("sam_tiny", checkpoint=save_sam_weights(build_model("sam_tiny", seed=5).sam, tmp_path / "t.pth"))
    predictor = SamPredictor(model.sam)
    image = _image(173, 301)
    predictor.set_image(image)
    _compare(model.sam, predictor, model, image)


@pytest.mark.slow
def test_parity_with_sam_predictor_vit_b_official_format(tmp_path):
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()  # randomly initialised official architecture
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)  # the official checkpoint format: a plain state dict
    del reference
    model = build_model("vit_b", checkpoint=path)  # samtune's loader
    official = sam_model_registry["vit_b"](checkpoint=str(path))  # segment_anything's own loader
    predictor = SamPredictor(official)
    image = _image(240, 320, seed=1)
    with torch.no_grad():
        predictor.set_image(image)
    _compare(official, predictor, model, image)
