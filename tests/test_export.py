"""scripts/export.py: training checkpoint -> plain segment_anything state dict (LoRA merged) and ONNX."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from segment_anything import SamPredictor

from samtune.model import ARCHITECTURES, CheckpointError, build_model, build_sam_from_arch, save_sam_weights
from samtune.model.export import check_onnx, onnx_example_inputs
from samtune.model.training_checkpoint import META_KEY
from samtune.predict.decoding import decode_prompts
from tests.test_finetune_modes import make_module, perturb_lora, save_like_lightning

ROOT = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "blocks": "all", "target_modules": ["qkv", "proj"]}

spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
export_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_script)


def write_run(run: Path, module, *, lora: dict | None, base: str | None = None, seed: int = 0) -> Path:
    """A run directory as the pipeline leaves it: config_resolved.yaml and checkpoints/last.ckpt."""
    (run / "checkpoints").mkdir(parents=True)
    finetune = {"mode": module.mode, **({"lora": lora} if lora else {})}
    config = {"seed": seed, "model": {"type": "sam_tiny", "checkpoint": base, "arch": {}}, "finetune": finetune,
              "eval": {"use_best": True}}
    (run / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    save_like_lightning(module, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    torch.manual_seed(0)
    module = make_module("lora", seed=0, lora=LORA)
    perturb_lora(module.model.sam)
    with torch.no_grad():
        for p in module.model.sam.mask_decoder.parameters():
            p.mul_(1.05)
    ckpt = write_run(run, module, lora=LORA)
    return run, ckpt, module


def sample_image_and_prompts():
    gen = np.random.default_rng(0)
    image = (gen.random((200, 300, 3)) * 255).astype(np.uint8)
    image[60:140, 80:200] = [220, 40, 40]
    prompts = [
        {"instance": 1, "box": [80, 60, 199, 139], "point1": {"points": [[140, 100]], "labels": [1]}},
        {"instance": 2, "box": [10, 10, 60, 90], "point1": {"points": [[30, 50]], "labels": [1]}},
        {"instance": 3, "box": [150, 20, 290, 190], "point1": {"points": [[250, 160]], "labels": [1]}},
    ]
    return image, prompts


def samtune_masks(model, image, prompts, mode):
    x, input_size, original_size = model.prepare_image(image)
    with torch.no_grad():
        embedding = model.embed(x)
    chunks = list(decode_prompts(model, embedding, prompts, mode, input_size=input_size, original_size=original_size))
    return torch.cat([p.masks for p in chunks]).numpy()


def predictor_masks(sam, image, prompts, mode):
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    out = []
    for p in prompts:
        if mode == "box":
            masks, _, _ = predictor.predict(box=np.array(p["box"]), multimask_output=False)
            out.append(masks[0])
        else:
            masks, scores, _ = predictor.predict(point_coords=np.array(p["point1"]["points"]),
                                                 point_labels=np.array(p["point1"]["labels"]), multimask_output=True)
            out.append(masks[int(np.argmax(scores))])
    return np.stack(out)


def test_cli_exports_merged_weights_that_segment_anything_predicts_with(lora_run, tmp_path):
    run, ckpt, module = lora_run
    out, onnx_path = tmp_path / "sam.pth", tmp_path / "decoder.onnx"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"ckpt={run}", f"out={out}",
                           f"onnx={onnx_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "onnxruntime vs PyTorch" in proc.stderr

    state = torch.load(out, map_location="cpu", weights_only=True)
    sam = build_sam_from_arch(ARCHITECTURES["sam_tiny"])
    assert list(state) == list(sam.state_dict())  # segment_anything's keys, nothing of peft's
    sam.load_state_dict(state, strict=True)
    sam.eval()
    exported = build_model("sam_tiny", checkpoint=out)  # samtune's loader of the same file
    assert all(torch.equal(a, b) for a, b in zip(exported.sam.state_dict().values(), state.values()))

    image, prompts = sample_image_and_prompts()
    evaluated = build_model("sam_tiny", checkpoint=ckpt)  # samtune's evaluation of the Lightning checkpoint
    for mode in ("box", "point1"):
        ours = samtune_masks(evaluated, image, prompts, mode)
        theirs = predictor_masks(sam, image, prompts, mode)
        assert np.array_equal(ours, theirs), mode
        assert ours.any(axis=(1, 2)).sum() >= 1
        # The unmerged LoRA model predicts the same masks up to float rounding at mask boundaries.
        unmerged = samtune_masks(module.model.eval(), image, prompts, mode)
        assert (unmerged == ours).mean() > 0.995, mode

    # ONNX: onnxruntime == PyTorch for another image size and number of points than at export ...
    inputs = onnx_example_inputs(sam, num_points=3)
    inputs["orig_im_size"] = torch.tensor([200.0, 300.0])
    assert check_onnx(onnx_path, sam, inputs) < 1e-3
    # ... and a click through ONNX (plus segment_anything's padding point) gives SamPredictor's best mask.
    import onnxruntime

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    point = np.array(prompts[0]["point1"]["points"], dtype=np.float32)
    coords = np.concatenate([point, np.zeros((1, 2), np.float32)])[None]
    coords = predictor.transform.apply_coords(coords, image.shape[:2]).astype(np.float32)
    feeds = {
        "image_embeddings": predictor.get_image_embedding().numpy(), "point_coords": coords,
        "point_labels": np.array([[1, -1]], np.float32), "mask_input": np.zeros((1, 1, 64, 64), np.float32),
        "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array(image.shape[:2], np.float32),
    }
    masks = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (1, 1, 200, 300)
    assert ((masks[0, 0] > 0) == want[int(np.argmax(scores))]).mean() > 0.999


def test_existing_outputs_are_not_overwritten(lora_run, tmp_path):
    run, _, _ = lora_run
    out = tmp_path / "sam.pth"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_script.main([f"ckpt={run}", f"out={out}"])
    with pytest.raises(FileExistsError, match="onnx="):
        export_script.main([f"ckpt={run}", f"out={tmp_path / 'new.pth'}", f"onnx={out}"])
    assert out.read_bytes() == b"mine" and not (tmp_path / "new.pth").exists()
    assert export_script.main([f"ckpt={run}", f"out={out}", "overwrite=true"]) == 0
    assert set(torch.load(out, weights_only=True)) == set(build_model("sam_tiny").sam.state_dict())
    with pytest.raises(SystemExit, match="unknown arguments"):
        export_script.main([f"ckpt={run}", f"out={out}", "rank=3"])


def test_settings_come_from_the_run_config_when_the_checkpoint_records_none(lora_run, tmp_path):
    run, ckpt, _ = lora_run
    stripped = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stripped.parent.mkdir(parents=True)
    (tmp_path / "run" / "config_resolved.yaml").write_text((run / "config_resolved.yaml").read_text())
    obj = torch.load(ckpt, weights_only=False)
    del obj[META_KEY]["base"], obj[META_KEY]["finetune"]["lora"]
    torch.save(obj, stripped)
    export_script.main([f"ckpt={stripped}", f"out={tmp_path / 'a.pth'}"])
    export_script.main([f"ckpt={ckpt}", f"out={tmp_path / 'b.pth'}"])
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="do not fit its weights"):
        export_script.main([f"ckpt={stripped}", f"out={tmp_path / 'c.pth'}", "lora.rank=2"])


def test_partial_checkpoint_needs_its_base(tmp_path):
    base = save_sam_weights(build_model("sam_tiny", seed=9).sam, tmp_path / "base.pth")
    module = make_module("decoder_only", seed=0, base=str(base))
    ckpt = write_run(tmp_path / "run", module, lora=None, base=str(base))
    moved = base.rename(tmp_path / "moved.pth")
    with pytest.raises(CheckpointError, match=r"base checkpoint .*base.pth, which is not found.*base=PATH"):
        export_script.main([f"ckpt={ckpt}", f"out={tmp_path / 'x.pth'}"])
    export_script.main([f"ckpt={ckpt}", f"out={tmp_path / 'x.pth'}", f"base={moved}"])
    state = torch.load(tmp_path / "x.pth", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in module.model.sam.state_dict().items())


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through a temporary file; the result has the permissions open() would give, not 0600."""
    import os
    import stat

    from samtune.model.checkpoint import save_state_dict
    from samtune.utils.io import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    weights = save_state_dict({"w": torch.zeros(2)}, tmp_path / "model.pth")
    text = atomic_write_text(tmp_path / "report.json", "{}")
    assert stat.S_IMODE(weights.stat().st_mode) == expected
    assert stat.S_IMODE(text.stat().st_mode) == expected


def test_a_list_of_checkpoints_exports_their_averaged_weights(tmp_path):
    """ckpt=[a,b]: the mean of the two runs' merged weights; checkpoints of different models are refused."""
    runs = []
    for seed in (1, 2):
        module = make_module("lora", seed=seed, lora=LORA)
        perturb_lora(module.model.sam)
        runs.append((write_run(tmp_path / f"run{seed}", module, lora=LORA), module))
    singles = []
    for i, (ckpt, _) in enumerate(runs):
        export_script.main([f"ckpt={ckpt}", f"out={tmp_path / f'single{i}.pth'}"])
        singles.append(torch.load(tmp_path / f"single{i}.pth", weights_only=True))
    assert export_script.main([f"ckpt=[{runs[0][0]},{runs[1][0]}]", f"out={tmp_path / 'avg.pth'}"]) == 0
    avg = torch.load(tmp_path / "avg.pth", weights_only=True)
    assert set(avg) == set(singles[0])
    for key, value in avg.items():
        torch.testing.assert_close(value, (singles[0][key] + singles[1][key]) / 2)
    assert not torch.equal(singles[0]["image_encoder.blocks.0.attn.qkv.weight"],
                           singles[1]["image_encoder.blocks.0.attn.qkv.weight"])
    build_model("sam_tiny", checkpoint=tmp_path / "avg.pth")  # a plain state dict samtune loads

    shallower = build_model("sam_tiny", seed=3, arch={"encoder_depth": 3, "encoder_global_attn_indexes": [2]})
    other = save_sam_weights(shallower.sam, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"cannot average .*other.pth.*keys differ"):
        export_script.main([f"ckpt=[{runs[0][0]},{other}]", f"out={tmp_path / 'bad.pth'}"])
    assert not (tmp_path / "bad.pth").exists()
