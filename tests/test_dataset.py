"""SamDataset items, SAM preprocessing parity, augmentation presets and batch collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.utils.data import DataLoader

from samtune.data import (
    AUGMENT_PRESETS,
    ImageRecord,
    SamDataset,
    build_augmentation,
    collate_instances,
    normalize_and_pad,
    resize_longest_side,
    resize_mask_longest_side,
)

S = 64


def _record(tmp_path, name, instances, h=40, w=60):
    """Write an image + uint16 id mask and return its record."""
    rng = np.random.default_rng(len(name))
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(instances.astype(np.uint16)).save(tmp_path / "masks" / f"{name}.png")
    return ImageRecord(image_path=tmp_path / "images" / f"{name}.png", rel_path=f"images/{name}.png",
                       split="train", mask_path=tmp_path / "masks" / f"{name}.png")


def _grid_instances(count, h=40, w=60):
    """``count`` separate 6x6 squares with ids 2, 4, 6, ... (relabelled to 1..count on load)."""
    ids = np.zeros((h, w), np.int32)
    for k in range(count):
        y, x = 2 + 9 * (k // 6), 2 + 9 * (k % 6)
        ids[y:y + 6, x:x + 6] = 2 * (k + 1)
    return ids


class _Encoder(nn.Module):
    img_size = S


def test_normalize_and_pad_matches_sam_preprocess():
    image = np.random.default_rng(0).integers(0, 256, (50, 64, 3), dtype=np.uint8)
    sam = Sam(image_encoder=_Encoder(), prompt_encoder=nn.Module(), mask_decoder=nn.Module())
    expected = sam.preprocess(torch.as_tensor(image).permute(2, 0, 1).contiguous()[None])[0]
    out = normalize_and_pad(image, S)
    assert out.dtype == torch.float32 and out.shape == (3, S, S)
    assert torch.equal(out, expected)


def test_resizers_match_resize_longest_side():
    image = np.random.default_rng(1).integers(0, 256, (37, 91, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_longest_side(image, S), ResizeLongestSide(S).apply_image(image))
    mask = resize_mask_longest_side(np.arange(37 * 91, dtype=np.int32).reshape(37, 91), S)
    assert mask.shape == ResizeLongestSide.get_preprocess_shape(37, 91, S) and mask.dtype == np.int32


def test_item_shapes_and_padding(tmp_path):
    ids = _grid_instances(3)
    item = SamDataset([_record(tmp_path, "a", ids)], img_size=S)[0]
    h, w = ResizeLongestSide.get_preprocess_shape(40, 60, S)
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert torch.all(item["image"][:, h:, :] == 0) and torch.all(item["image"][:, :, w:] == 0)
    assert item["masks"].shape == (3, S, S) and item["masks"].dtype == torch.bool
    assert not item["masks"][:, h:, :].any() and not item["masks"][:, :, w:].any()
    assert item["input_size"].tolist() == [h, w] and item["original_size"].tolist() == [40, 60]
    assert item["index"] == 0 and item["rel_path"] == "images/a.png"
    expected = resize_mask_longest_side((ids > 0).astype(np.int32), S)
    union = item["masks"].any(0)[:h, :w].numpy()
    np.testing.assert_array_equal(union, expected > 0)
    assert (item["masks"].sum(0) <= 1).all()  # instances do not overlap


def test_zero_instances(tmp_path):
    item = SamDataset([_record(tmp_path, "z", np.zeros((40, 60)))], img_size=S)[0]
    assert item["masks"].shape == (0, S, S)
    assert torch.isfinite(item["image"]).all()


def test_min_instance_area_drops_tiny(tmp_path):
    ids = _grid_instances(2)
    ids[35, 55] = 99  # one pixel
    item = SamDataset([_record(tmp_path, "t", ids)], img_size=S, min_instance_area=4)[0]
    assert item["masks"].shape[0] == 2


def test_max_instances_sampling_is_seeded(tmp_path):
    ds = SamDataset([_record(tmp_path, "m", _grid_instances(12))], img_size=S, max_instances=3)

    def chosen(seed):
        np.random.seed(seed)
        masks = ds[0]["masks"]
        assert masks.shape == (3, S, S)
        return tuple(int(m.nonzero()[0].sum()) for m in masks)

    assert chosen(0) == chosen(0)
    assert len({chosen(seed) for seed in range(6)}) > 1


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_augmentation_presets_keep_ids(preset):
    aug = build_augmentation(preset, seed=0)
    if preset == "none":
        assert aug is None
        return
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ids = _grid_instances(5) * 1000  # large values catch any interpolation between ids
    for _ in range(5):
        out = aug(image=image, mask=ids)
        assert out["image"].dtype == np.uint8 and out["image"].shape[2] == 3
        assert out["mask"].shape == out["image"].shape[:2]
        assert set(np.unique(out["mask"]).tolist()) <= set(np.unique(ids).tolist())


def test_unknown_preset():
    with pytest.raises(ValueError, match="data.augment.*light"):
        build_augmentation("medium")


def test_augmented_items_are_reproducible(tmp_path):
    ds = SamDataset([_record(tmp_path, "g", _grid_instances(6))], img_size=S, augment=build_augmentation("strong"))
    np.random.seed(3)
    first = ds[0]
    np.random.seed(3)
    again = ds[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["masks"], again["masks"])
    assert first["masks"].shape[1:] == (S, S)


def test_collate_pads_masks(tmp_path):
    ds = SamDataset([_record(tmp_path, "a", _grid_instances(2)), _record(tmp_path, "b", np.zeros((30, 20)), h=30, w=20)],
                    img_size=S)
    batch = collate_instances([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, S, S)
    assert batch["masks"].shape == (2, 2, S, S) and batch["masks"].dtype == torch.bool
    assert batch["valid"].tolist() == [[True, True], [False, False]]
    assert not batch["masks"][1].any()
    assert batch["input_size"].shape == (2, 2) and batch["original_size"].tolist() == [[40, 60], [30, 20]]
    assert batch["index"] == [0, 1] and batch["rel_path"] == ["images/a.png", "images/b.png"]
    empty = collate_instances([ds[1]])
    assert empty["masks"].shape == (1, 1, S, S) and empty["valid"].tolist() == [[False]]


def test_dataloader_round_trip(tmp_path):
    ds = SamDataset([_record(tmp_path, f"r{k}", _grid_instances(k + 1)) for k in range(3)], img_size=S)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_instances))
    assert [b["masks"].shape[1] for b in batches] == [2, 3]
    assert batches[1]["valid"].sum().item() == 3


def test_workers_draw_different_random_numbers(tmp_path):
    record = _record(tmp_path, "w", _grid_instances(12))
    ds = SamDataset([record, record], img_size=S, max_instances=3)
    np.random.seed(0)  # forked workers inherit one numpy state; PyTorch reseeds numpy per worker
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_instances)
    first, second = (batch["masks"][0] for batch in loader)
    assert not torch.equal(first, second)


class _CvThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2

        return cv2.getNumThreads()


def test_loader_workers_run_opencv_single_threaded(tmp_path):
    from samtune.training.datamodule import SamDataModule, loader_worker_init

    records = [_record(tmp_path, f"c{k}", _grid_instances(2)) for k in range(2)]
    dm = SamDataModule(records, records, img_size=S, num_workers=1)
    loader = dm.train_dataloader()
    assert loader.worker_init_fn is loader_worker_init and loader.num_workers == 1
    assert SamDataModule(records, [], img_size=S).train_dataloader().worker_init_fn is None  # no workers
    seen = list(DataLoader(_CvThreads(), batch_size=None, num_workers=1, worker_init_fn=loader_worker_init))
    assert seen == [1, 1]  # setNumThreads(0): OpenCV's own code runs sequentially in the worker


def test_importing_samtune_does_not_ask_pypi_for_albumentations_updates():
    import os
    import subprocess
    import sys

    code = (
        "import socket\n"
        "calls = []\n"
        "def lookup(*a, **k):\n"
        "    calls.append(a)\n"
        "    raise OSError('offline')\n"
        "socket.getaddrinfo = lookup\n"
        "import samtune.data.transforms\n"
        "print(len(calls))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr
