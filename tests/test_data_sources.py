"""Folder and COCO scanners: pairing, validation, clear errors, skip reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data import DataError, build_records, load_record, scan_coco, scan_folder


def _image(path, h=12, w=10):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def _mask(path, h=12, w=10, blobs=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), np.uint8)
    for k in range(blobs):
        mask[1 + 3 * k: 3 + 3 * k, 1:4] = 255
    Image.fromarray(mask).save(path)
    return path


def _pair(root, split, name, ext=".png", **kw):
    _image(root / split / "images" / f"{name}{ext}", **kw)
    _mask(root / split / "masks" / f"{name}.png", **kw)


def test_scan_folder_pairs_and_sorts(tmp_path):
    for name, ext in [("b", ".jpg"), ("a", ".png"), ("c", ".tif")]:
        _pair(tmp_path, "train", name, ext)
    (tmp_path / "train" / "images" / "notes.txt").write_text("ignored")
    records, skipped = scan_folder(tmp_path, "train")
    assert skipped == []
    assert [r.rel_path for r in records] == ["train/images/a.png", "train/images/b.jpg", "train/images/c.tif"]
    assert records[0].mask_path == tmp_path / "train" / "masks" / "a.png"
    assert all(r.split == "train" for r in records)
    image, inst = load_record(records[0])
    assert image.shape == (12, 10, 3) and inst.max() == 1


def test_missing_split_lists_existing_folders(tmp_path):
    _pair(tmp_path, "train", "a")
    (tmp_path / "validation").mkdir()
    with pytest.raises(DataError, match="'val' not found") as info:
        scan_folder(tmp_path, "val")
    assert "train" in str(info.value) and "validation" in str(info.value)


def test_no_images(tmp_path):
    (tmp_path / "test" / "images").mkdir(parents=True)
    (tmp_path / "test" / "masks").mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan_folder(tmp_path, "test")


def test_image_without_mask_and_mask_without_image(tmp_path):
    _pair(tmp_path, "train", "ok")
    _image(tmp_path / "train" / "images" / "lonely.png")
    with pytest.raises(DataError, match="image without mask") as info:
        scan_folder(tmp_path, "train")
    assert "lonely.png" in str(info.value)
    (tmp_path / "train" / "images" / "lonely.png").unlink()
    _mask(tmp_path / "train" / "masks" / "orphan.png")
    with pytest.raises(DataError, match="mask without image") as info:
        scan_folder(tmp_path, "train")
    assert "orphan.png" in str(info.value)


def test_duplicate_ids(tmp_path):
    _pair(tmp_path, "train", "a")
    _image(tmp_path / "train" / "images" / "a.jpg")
    with pytest.raises(DataError, match="share the id 'a'"):
        scan_folder(tmp_path, "train")


def test_unreadable_image_names_file(tmp_path):
    _pair(tmp_path, "train", "good")
    (tmp_path / "train" / "images" / "x.png").write_text("not an image")
    _mask(tmp_path / "train" / "masks" / "x.png")
    with pytest.raises(DataError, match="cannot read image") as info:
        scan_folder(tmp_path, "train")
    assert str(tmp_path / "train" / "images" / "x.png") in str(info.value)
    records, _ = scan_folder(tmp_path, "train", validate=False)  # pairing only, nothing loaded
    assert len(records) == 2


def test_mask_size_mismatch_names_mask(tmp_path):
    _image(tmp_path / "train" / "images" / "a.png", h=12, w=10)
    _mask(tmp_path / "train" / "masks" / "a.png", h=6, w=8)
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path, "train")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "train" / "masks" / "a.png"))
    assert "mask is 8x6 but image" in message and "is 10x12" in message


def test_several_problems_in_one_error(tmp_path):
    _pair(tmp_path, "train", "ok")
    _image(tmp_path / "train" / "images" / "m1.png")
    _mask(tmp_path / "train" / "masks" / "m2.png")
    with pytest.raises(DataError, match="2 invalid items") as info:
        scan_folder(tmp_path, "train")
    assert "m1.png" in str(info.value) and "m2.png" in str(info.value)


def test_skip_invalid_skips_and_reports(tmp_path):
    _pair(tmp_path, "train", "good")
    _image(tmp_path / "train" / "images" / "nomask.png")
    _mask(tmp_path / "train" / "masks" / "noimage.png")
    (tmp_path / "train" / "images" / "broken.png").write_text("x")
    _mask(tmp_path / "train" / "masks" / "broken.png")
    _image(tmp_path / "train" / "images" / "size.png", h=12, w=10)
    _mask(tmp_path / "train" / "masks" / "size.png", h=5, w=5)
    with pytest.warns(UserWarning, match="skipped 4 invalid items"):
        records, skipped = scan_folder(tmp_path, "train", skip_invalid=True)
    assert [r.rel_path for r in records] == ["train/images/good.png"]
    files = {item["file"]: item["reason"] for item in skipped}
    assert set(files) == {"train/images/nomask.png", "train/masks/noimage.png", "train/images/broken.png",
                          "train/masks/size.png"}
    assert "cannot read image" in files["train/images/broken.png"]
    assert "mask is 5x5" in files["train/masks/size.png"]


def test_many_items_are_checked_in_threads_and_reported_in_order(tmp_path):
    for i in range(70):  # enough for several loader threads
        _pair(tmp_path, "train", f"p{i:02d}")
    for bad in ("p05", "p41"):
        (tmp_path / "train" / "images" / f"{bad}.png").write_text("x")
    with pytest.warns(UserWarning, match="skipped 2 invalid items"):
        records, skipped = scan_folder(tmp_path, "train", skip_invalid=True)
    assert [r.rel_path for r in records] == [f"train/images/p{i:02d}.png" for i in range(70) if i not in (5, 41)]
    assert [item["file"] for item in skipped] == ["train/images/p05.png", "train/images/p41.png"]


def test_skip_invalid_still_raises_structural(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path, "train", skip_invalid=True)


def test_binary_as_one_object_passes_through(tmp_path):
    _image(tmp_path / "s" / "images" / "a.png")
    _mask(tmp_path / "s" / "masks" / "a.png", blobs=2)
    records, _ = scan_folder(tmp_path, "s")
    assert load_record(records[0])[1].max() == 2
    assert load_record(records[0], binary_as_one_object=True)[1].max() == 1


def _coco_split(root, split="val"):
    """Three images: polygon + crowd, RLE, none."""
    for name in ("p.png", "r.png", "empty.png"):
        _image(root / split / "imgs" / name, h=20, w=30)
    blob = np.zeros((20, 30), np.uint8)
    blob[5:15, 10:20] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode("ascii")
    coco = {
        "images": [{"id": 1, "file_name": "imgs/p.png", "height": 20, "width": 30},
                   {"id": 2, "file_name": "imgs/r.png", "height": 20, "width": 30},
                   {"id": 3, "file_name": "imgs/empty.png", "height": 20, "width": 30}],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": [[1, 1, 8, 1, 8, 8, 1, 8]], "iscrowd": 0},
            {"id": 11, "image_id": 1, "segmentation": [[20, 10, 28, 10, 28, 18, 20, 18]], "iscrowd": 0},
            {"id": 12, "image_id": 1, "segmentation": [[0, 0, 29, 0, 29, 19, 0, 19]], "iscrowd": 1},
            {"id": 13, "image_id": 2, "segmentation": rle, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / split / "annotations.json").write_text(json.dumps(coco))
    return coco


def test_scan_coco(tmp_path):
    _coco_split(tmp_path)
    records, skipped = scan_coco(tmp_path, "val")
    assert skipped == []
    assert [r.rel_path for r in records] == ["val/imgs/empty.png", "val/imgs/p.png", "val/imgs/r.png"]
    counts = [load_record(r)[1].max() for r in records]
    assert counts == [0, 2, 1]  # crowd skipped, empty image kept
    assert build_records("coco", tmp_path, "val", binary_as_one_object=True)[0] == records


def _rewrite(root, change):
    path = root / "val" / "annotations.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize("change, match", [
    (lambda c: c["images"][0].update(file_name="imgs/gone.png"), "gone.png.*not found"),
    (lambda c: c["annotations"].append({"id": 99, "image_id": 42, "segmentation": []}), "unknown image_id 42"),
    (lambda c: c["images"][1].update(width=31), "say the image is 31x20 but the file is 30x20"),
    (lambda c: c["annotations"][0].update(segmentation={"counts": 5}), "annotation id 10: cannot decode"),
])
def test_coco_item_errors(tmp_path, change, match):
    _coco_split(tmp_path)
    _rewrite(tmp_path, change)
    with pytest.raises(DataError, match=match):
        scan_coco(tmp_path, "val")
    with pytest.warns(UserWarning):
        records, skipped = scan_coco(tmp_path, "val", skip_invalid=True)
    assert len(skipped) == 1 and len(records) >= 2


def test_coco_missing_and_invalid_json(tmp_path):
    _coco_split(tmp_path)
    path = tmp_path / "val" / "annotations.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON") as info:
        scan_coco(tmp_path, "val")
    assert str(path) in str(info.value)
    path.unlink()
    with pytest.raises(DataError, match="annotations.json: COCO annotation file not found"):
        scan_coco(tmp_path, "val")


def test_build_records_dispatch(tmp_path):
    _pair(tmp_path, "train", "a")
    assert len(build_records("folder", tmp_path, "train")[0]) == 1
    with pytest.raises(ValueError, match="data.source"):
        build_records("voc", tmp_path, "train")
