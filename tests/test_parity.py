"""samtune's own evaluation path gives SamPredictor's image embedding, masks and IoUs for the same weights.

Both sides are built independently: samtune's model by ``samtune.model.build_model`` from an official-format
state dict, the reference by segment_anything itself (``sam_model_registry`` for vit_b; segment_anything's own
modeling classes, with sam_tiny's sizes written out here, for sam_tiny), loaded with the same file. samtune's
side is its evaluator (``evaluate_model``: its own preprocessing, its own encoder call, its own decoding); the
reference side is ``SamPredictor``. The encoder therefore runs twice, once on each side.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samtune.data.records import load_record
from samtune.data.sources import scan_folder
from samtune.evaluation.evaluator import evaluate_model
from samtune.model import build_model, save_sam_weights

MODES = ("box", "point1", "point3")
ROOT = Path(__file__).resolve().parents[1]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = (250, 30, 30)
    return img


def _prompts(h: int, w: int, rows: int, cols: int) -> list[dict]:
    """One instance per cell of a rows x cols grid over the image: its box, its centre (point1), and the centre, a
    second inner point and a negative point in the next cell (point3). Many single points, so that SamPredictor's
    choice among the multimask outputs varies (and the single-mask output sometimes scores highest)."""
    out = []
    ch, cw = h // rows, w // cols
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = c * cw + 3, r * ch + 3, (c + 1) * cw - 4, (r + 1) * ch - 4
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            nx = (cx + cw) % (cols * cw)
            out.append({"instance": len(out) + 1, "box": [x0, y0, x1, y1],
                        "point1": {"points": [[cx, cy]], "labels": [1]},
                        "point3": {"points": [[cx, cy], [x0 + 2, y1 - 2], [nx, cy]], "labels": [1, 1, 0]}})
    return out


def _official_sam_tiny() -> Sam:
    """sam_tiny's architecture (data/checkpoints/sam_tiny_generalist.md) from segment_anything's classes, wired as
    segment_anything's ``build_sam._build_sam`` wires vit_b, with SAM's own pixel statistics (Sam's defaults):
    built here, not by samtune's builder."""
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=6, embed_dim=160, img_size=256, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=5, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5), window_size=8,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=1024, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )


def _write_image(root: Path, image: np.ndarray, prompts: list[dict]) -> Path:
    """A one-image folder dataset (``root/test/{images,masks}``) whose mask holds each prompt's box as its instance."""
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "masks").mkdir(parents=True)
    cv2.imwrite(str(root / "test" / "images" / "a.png"), image[..., ::-1])  # PNG: lossless
    ids = np.zeros(image.shape[:2], np.uint8)
    for p in prompts:
        x0, y0, x1, y1 = p["box"]
        ids[y0:y1, x0:x1] = p["instance"]
    cv2.imwrite(str(root / "test" / "masks" / "a.png"), ids)
    return root


def _reference(predictor: SamPredictor, prompt: dict, mode: str) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """SamPredictor's mask, its logits and its score for one prompt, chosen as SAM recommends (the best multimask
    output for one point), and whether the single-mask output would have scored higher than that choice."""
    threshold = predictor.model.mask_threshold
    if mode == "box":
        logits, scores, _ = predictor.predict(box=np.array(prompt["box"]), multimask_output=False, return_logits=True)
        return logits[0] > threshold, logits[0], float(scores[0]), False
    coords, labels = np.array(prompt[mode]["points"]), np.array(prompt[mode]["labels"])
    logits, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=mode == "point1",
                                          return_logits=True)
    best = int(np.argmax(scores))
    single_higher = False
    if mode == "point1":
        _, single, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=False)
        single_higher = float(single[0]) > float(scores[best])
    return logits[best] > threshold, logits[best], float(scores[best]), single_higher


def _check_parity(tmp_path: Path, model, official: Sam, image: np.ndarray, prompts: list[dict], *,
                  varied_choice: bool = False) -> None:
    """samtune's ``model`` (its evaluator) against SamPredictor on ``official``, for ``prompts`` in every mode.

    ``varied_choice``: also require that the one-point prompts exercise SAM's output choice (trained weights do; a
    random IoU head ranks the outputs the same way for every prompt).
    """
    # 1. Same weights: the same keys (a key missing on either side fails here), each tensor equal.
    ours_sd, ref_sd = model.sam.state_dict(), official.state_dict()
    assert set(ours_sd) == set(ref_sd), sorted(set(ours_sd) ^ set(ref_sd))[:10]
    for key, value in ref_sd.items():
        assert ours_sd[key].dtype == value.dtype and torch.equal(ours_sd[key], value), key
    # samtune's normalisation constants (non-persistent buffers) are SAM's: the official model has Sam's defaults
    assert torch.equal(model.sam.pixel_mean, official.pixel_mean) and torch.equal(model.sam.pixel_std, official.pixel_std)

    # 2. The reference: segment_anything's own predictor on the official model.
    predictor = SamPredictor(official)
    predictor.set_image(image)
    reference = {(mode, p["instance"]): _reference(predictor, p, mode) for mode in MODES for p in prompts}
    assert any(0 < m.sum() < m.size for m, _, _, _ in reference.values())  # masks with something to compare
    if varied_choice:
        chosen = {int(np.argmax(predictor.predict(point_coords=np.array(p["point1"]["points"]),
                                                  point_labels=np.array(p["point1"]["labels"]))[1]))
                  for p in prompts}
        assert len(chosen) > 1 and any(single for _, _, _, single in reference.values())

    # 3. samtune's evaluator on the same image, read back from a dataset file; model.embed is wrapped only to
    # record what the evaluator feeds the encoder and the embedding it computes.
    records, _ = scan_folder(_write_image(tmp_path / "data", image, prompts), "test")
    loaded, _ = load_record(records[0])
    assert np.array_equal(loaded, image)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    embed = model.embed

    def recording_embed(x: torch.Tensor) -> torch.Tensor:
        out = embed(x)
        seen.append((x.clone(), out.clone()))
        return out

    model.embed = recording_embed
    try:
        result = evaluate_model(model, records, {records[0].rel_path: prompts}, name="parity", modes=MODES,
                                save_masks=True)
    finally:
        del model.embed
    assert len(seen) == 1  # the image was embedded once, by samtune's own encoder call
    x, ours = seen[0]
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(x, official.preprocess(resized), atol=0, rtol=0)  # same pixels into the encoder
    assert ours.shape == predictor.features.shape
    # the same embedding (bit for bit on this project's CPU: the same ops on the same input)
    torch.testing.assert_close(ours, predictor.features, rtol=1e-5, atol=1e-6)

    # 4. The evaluator's masks and predicted IoUs are SamPredictor's, prompt by prompt, in every mode. The evaluator
    # decodes all prompts of an image in one batched call, SamPredictor one at a time (and maps prompts to the input
    # frame in float64): float rounding may flip a pixel whose logit is at the threshold, and nothing else.
    rows = {(r["mode"], r["instance"]): r for r in result.rows}
    assert set(rows) == set(reference)
    for key, (ref_mask, ref_logits, ref_score, _) in reference.items():
        rle = dict(rows[key]["mask_rle"])
        rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode(rle).astype(bool)
        assert mask.shape == ref_mask.shape, key
        flipped = mask != ref_mask
        assert flipped.mean() < 1e-3 and np.abs(ref_logits[flipped]).max(initial=0.0) < 1e-3, key
        assert abs(rows[key]["pred_iou"] - ref_score) < 1e-5, key


def _official_sam_tiny_from(path: Path) -> Sam:
    official = _official_sam_tiny().eval()
    official.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict; float16 -> float32
    return official


def test_parity_with_sam_predictor_sam_tiny(tmp_path):
    """Random weights, saved in the official format."""
    path = save_sam_weights(build_model("sam_tiny", seed=5).sam, tmp_path / "sam_tiny_random.pth")
    model = build_model("sam_tiny", checkpoint=path)  # samtune's loader
    image = _image(173, 301)
    _check_parity(tmp_path, model, _official_sam_tiny_from(path), image, _prompts(173, 301, 3, 4))


def test_parity_with_sam_predictor_sam_tiny_shipped_weights(tmp_path):
    """The shipped generalist (a float16 official-format state dict): trained weights, whose IoU head picks
    different multimask outputs for different points, so the output choice is compared too."""
    path = ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt"
    model = build_model("sam_tiny", checkpoint=path)
    image = _image(173, 301)
    _check_parity(tmp_path, model, _official_sam_tiny_from(path), image, _prompts(173, 301, 3, 4),
                  varied_choice=True)


@pytest.mark.slow
def test_parity_with_sam_predictor_vit_b_official_format(tmp_path):
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()  # randomly initialised official architecture
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)  # the official checkpoint format: a plain state dict
    del reference
    model = build_model("vit_b", checkpoint=path)  # samtune's loader
    official = sam_model_registry["vit_b"](checkpoint=str(path)).eval()  # segment_anything's own loader
    _check_parity(tmp_path, model, official, _image(240, 320, seed=1), _prompts(240, 320, 1, 3))
