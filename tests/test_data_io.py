"""Image and mask readers: every format ends as RGB uint8 / int32 instance ids."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data import DataError, coco_instances, load_image, load_instance_mask


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgb_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path / "a.png", rgb))
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = load_image(_save(tmp_path / "g.png", gray))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    out = load_image(_save(tmp_path / "a.png", rgba))
    assert out.shape == (4, 6, 3)
    assert (out == np.array([10, 20, 30], np.uint8)).all()


def test_palette_image_goes_through_palette(tmp_path):
    im = Image.new("P", (5, 4))
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.putpixel((2, 1), 1)
    im.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[1, 2], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])


def test_16bit_png_is_scaled_by_min_max(tmp_path):
    arr = np.linspace(1000, 60000, 48).astype(np.uint16).reshape(6, 8)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    out = load_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # monotone mapping


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiff_16bit_and_float(tmp_path, dtype):
    arr = (np.arange(30).reshape(5, 6) * 7 + 3).astype(dtype)
    tifffile.imwrite(tmp_path / "t.tif", arr)
    out = load_image(tmp_path / "t.tif")
    assert out.dtype == np.uint8 and out.shape == (5, 6, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_rgb_tiff_keeps_channel_order(tmp_path):
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[..., 0] = 250
    tifffile.imwrite(tmp_path / "c.tiff", arr)
    out = load_image(tmp_path / "c.tiff")
    assert out[0, 0].tolist() == [250, 0, 0]


@pytest.mark.parametrize("content", [b"this is not an image", b""])
def test_unreadable_image_names_file(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_png_names_file(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = (_save(tmp_path / "full.png", rgb)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def _two_blobs(value):
    mask = np.zeros((10, 12), np.uint8)
    mask[1:4, 1:4] = value
    mask[6:9, 7:11] = value
    return mask


@pytest.mark.parametrize("value", [255, 1])
def test_binary_mask_gives_connected_components(tmp_path, value):
    inst = load_instance_mask(_save(tmp_path / "m.png", _two_blobs(value)))
    assert inst.dtype == np.int32 and inst.shape == (10, 12)
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2]
    assert (inst[1:4, 1:4] == 1).all() and (inst[6:9, 7:11] == 2).all()


def test_binary_components_are_8_connected(tmp_path):
    mask = np.zeros((5, 5), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 255
    assert load_instance_mask(_save(tmp_path / "d.png", mask)).max() == 1


def test_binary_as_one_object(tmp_path):
    inst = load_instance_mask(_save(tmp_path / "m.png", _two_blobs(255)), binary_as_one_object=True)
    assert sorted(np.unique(inst).tolist()) == [0, 1]


def test_empty_mask_has_no_instances(tmp_path):
    inst = load_instance_mask(_save(tmp_path / "e.png", np.zeros((4, 4), np.uint8)))
    assert inst.max() == 0


def test_uint16_ids_relabelled_in_order(tmp_path):
    ids = np.zeros((6, 6), np.uint16)
    ids[0, :2], ids[2, :3], ids[4, :] = 65000, 7, 300
    Image.fromarray(ids).save(tmp_path / "ids.png")
    inst = load_instance_mask(tmp_path / "ids.png")
    assert inst.dtype == np.int32
    assert inst[2, 0] == 1 and inst[4, 0] == 2 and inst[0, 0] == 3 and inst[5, 5] == 0


def test_uint8_ids_and_equal_channel_rgb(tmp_path):
    ids = np.zeros((5, 5), np.uint8)
    ids[0, 0], ids[1, 1], ids[2, 2] = 3, 9, 3
    inst = load_instance_mask(_save(tmp_path / "ids.png", ids))
    assert inst[0, 0] == inst[2, 2] == 1 and inst[1, 1] == 2  # ids, not components
    rgb = load_instance_mask(_save(tmp_path / "rgb.png", np.repeat(ids[..., None], 3, axis=2)))
    np.testing.assert_array_equal(rgb, inst)


def test_colour_mask_is_rejected(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    colour[1, 1] = (0, 255, 0)
    with pytest.raises(DataError, match="single-channel") as info:
        load_instance_mask(_save(tmp_path / "c.png", colour))
    assert "c.png" in str(info.value)


def test_unreadable_mask_names_file(tmp_path):
    (tmp_path / "m.png").write_text("garbage")
    with pytest.raises(DataError, match="m.png"):
        load_instance_mask(tmp_path / "m.png")


def _square(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def test_coco_polygon_rle_and_crowd():
    h, w = 20, 30
    blob = np.zeros((h, w), np.uint8, order="F")
    blob[12:18, 20:28] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"id": 1, "segmentation": [_square(2, 2, 8, 8)], "iscrowd": 0},
        {"id": 2, "segmentation": rle, "iscrowd": 0},
        {"id": 3, "segmentation": [_square(0, 0, 29, 19)], "iscrowd": 1},
    ]
    inst = coco_instances(anns, h, w)
    assert inst.dtype == np.int32 and inst.shape == (h, w)
    assert inst.max() == 2
    assert (inst[4, 4] == 1) and (inst[14, 22] == 2) and inst[0, 29] == 0
    np.testing.assert_array_equal(inst == 2, blob.astype(bool))


def test_coco_uncompressed_rle():
    h, w = 6, 5
    mask = np.zeros((h, w), np.uint8)
    mask[:, 2] = 1  # column-major runs: 12 zeros, 6 ones, 12 zeros
    inst = coco_instances([{"id": 5, "segmentation": {"size": [h, w], "counts": [12, 6, 12]}}], h, w)
    np.testing.assert_array_equal(inst, mask)


def test_coco_overlap_keeps_smaller_instance():
    anns = [{"id": 1, "segmentation": [_square(4, 4, 6, 6)]}, {"id": 2, "segmentation": [_square(0, 0, 15, 15)]}]
    inst = coco_instances(anns, 16, 16)
    assert inst[5, 5] == 1 and inst[12, 12] == 2


def test_coco_undecodable_names_annotation():
    with pytest.raises(ValueError, match="annotation id 9"):
        coco_instances([{"id": 9, "segmentation": {"size": [3, 3], "counts": "x"}}], 4, 4)
    with pytest.raises(ValueError, match="annotation id 10"):
        coco_instances([{"id": 10, "segmentation": [[1, 2]]}], 4, 4)
