"""Synthetic PCB and nucleus generators: determinism, layout, atomic and safe (re)generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from samtune.data import (
    DataError,
    ensure_medical_dataset,
    ensure_pcb_dataset,
    generate_medical_dataset,
    generate_pcb_dataset,
    load_instance_mask,
    scan_folder,
)

SMALL = {"n_train": 3, "n_val": 1, "n_test": 2}
GENERATORS = [generate_pcb_dataset, generate_medical_dataset]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("generate", GENERATORS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, generate):
    a = _files(generate(tmp_path / "a", seed=5, **SMALL))
    b = _files(generate(tmp_path / "b", seed=5, **SMALL))
    c = _files(generate(tmp_path / "c", seed=6, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/images/train_0000.png"] != c["train/images/train_0000.png"]
    assert len([k for k in a if k.endswith(".png")]) == 2 * 6


@pytest.mark.parametrize("generate", GENERATORS)
def test_layout_sizes_and_instances(tmp_path, generate):
    root = generate(tmp_path / "d", seed=0, n_train=6, n_val=1, n_test=1)
    manifest = json.loads((root / "DONE.json").read_text())
    assert manifest["params"] == {"n_train": 6, "n_val": 1, "n_test": 1, "seed": 0}
    records, skipped = scan_folder(root, "train")
    assert len(records) == 6 and skipped == []
    sizes, counts = set(), []
    for record in records:
        with Image.open(record.image_path) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
            assert all(192 <= side <= 320 for side in im.size)
        raw = np.asarray(Image.open(record.mask_path))
        assert raw.dtype == np.uint16 and raw.shape == (im.size[1], im.size[0])
        inst = load_instance_mask(record.mask_path)
        counts.append(int(inst.max()))
        if inst.max():
            assert np.bincount(inst.ravel())[1:].min() >= 16
    assert len(sizes) > 1
    assert sum(c >= 1 for c in counts) >= 5
    assert manifest["stats"]["train"]["instances"] == sum(counts)


def test_ensure_skips_when_done_and_regenerates_on_change(tmp_path):
    out = tmp_path / "pcb"
    ensure_pcb_dataset(out, seed=1, **SMALL)
    marker = out / "train" / "images" / "train_0000.png"
    stamp = marker.stat().st_mtime_ns
    assert ensure_pcb_dataset(out, seed=1, **SMALL) == out.absolute()
    assert marker.stat().st_mtime_ns == stamp
    ensure_pcb_dataset(out, seed=2, **SMALL)
    assert json.loads((out / "DONE.json").read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pcb"]  # no temp or old dirs left


def test_ensure_refuses_folder_without_manifest(tmp_path):
    out = ensure_medical_dataset(tmp_path / "med", seed=0, **SMALL)
    (out / "DONE.json").unlink()
    (out / "train" / "images" / "train_0000.png").unlink()
    with pytest.raises(DataError, match="refusing to overwrite"):  # no manifest: may be the user's
        ensure_medical_dataset(out, seed=0, **SMALL)


def test_never_overwrites_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate_pcb_dataset(out, **SMALL)
    assert (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_medical_dataset(empty, **SMALL) / "DONE.json").is_file()


def test_scene_soft_edges_option_is_recorded_and_zero_keeps_the_old_scenes(tmp_path):
    from samtune.data.synthetic_scenes import ensure_scenes_dataset, render_scene

    rng = lambda: np.random.default_rng([0, 0, 7])  # noqa: E731
    plain, plain_inst = render_scene(rng())
    off, off_inst = render_scene(rng(), soft_edges=0.0)
    assert np.array_equal(plain, off) and np.array_equal(plain_inst, off_inst)  # 0 draws no random numbers
    soft, soft_inst = render_scene(rng(), soft_edges=1.0)
    assert not np.array_equal(plain, soft)
    with pytest.raises(ValueError, match="soft_edges"):
        render_scene(rng(), soft_edges=1.5)

    out = tmp_path / "scenes"
    ensure_scenes_dataset(out, n_train=1, n_val=0, n_test=0, soft_edges=0.5)
    manifest = json.loads((out / "DONE.json").read_text())
    assert manifest["params"] == {"n_train": 1, "n_val": 0, "n_test": 0, "seed": 0, "soft_edges": 0.5}
    stamp = (out / "train" / "images" / "train_0000.png").read_bytes()
    ensure_scenes_dataset(out, n_train=1, n_val=0, n_test=0, soft_edges=0.0)  # another option: regenerated
    assert json.loads((out / "DONE.json").read_text())["params"]["soft_edges"] == 0.0
    assert (out / "train" / "images" / "train_0000.png").read_bytes() != stamp
    with pytest.raises(ValueError, match="unknown key.*soft_edge"):
        ensure_scenes_dataset(out, n_train=1, soft_edge=0.5)
    for bad in (1.5, -0.1, "lots"):  # refused before anything is generated or replaced
        with pytest.raises(ValueError, match="soft_edges must be a share in"):
            ensure_scenes_dataset(tmp_path / "never", n_train=1, soft_edges=bad)
    assert not (tmp_path / "never").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]


def test_soft_edged_objects_fade_towards_their_boundary():
    from samtune.data.synthetic_common import Canvas
    from samtune.data.synthetic_scenes import _soften

    canvas = Canvas(np.zeros((40, 40, 3), np.float32))
    sub = np.zeros((21, 21), np.uint8)
    sub[1:20, 1:20] = 1
    faded = _soften(canvas, np.random.default_rng(0), sub, (10, 10, 21, 21), np.full((21, 21, 3), 200.0))
    assert faded[10, 10, 0] > 150  # the centre keeps most of the object's colour
    assert 15 < faded[1, 10, 0] < 110  # the edge pixel is mostly background (opacity 0.1-0.5)
    assert faded[1, 10, 0] < faded[5, 10, 0] < faded[10, 10, 0]


def test_generated_dataset_folders_get_ordinary_permissions(tmp_path):
    """Generated datasets are built in a temporary folder and renamed; the result is as mkdir would make it."""
    import os
    import stat

    from samtune.data.synthetic_scenes import ensure_scenes_dataset

    mask = os.umask(0)
    os.umask(mask)
    out = ensure_scenes_dataset(tmp_path / "scenes", n_train=1, n_val=0, n_test=0)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "DONE.json").stat().st_mode) == 0o666 & ~mask


def test_parallel_rendering_writes_the_same_bytes(tmp_path, monkeypatch):
    from samtune.data.synthetic_common import generation_workers, write_dataset
    from samtune.data.synthetic_scenes import GENERATOR, VERSION, render_scene

    counts = {"train": 5, "val": 1, "test": 2}
    kwargs = {"generator": GENERATOR, "version": VERSION, "counts": counts, "seed": 3, "options": {"soft_edges": 0.5}}
    one = write_dataset(tmp_path / "one", render_scene, workers=1, **kwargs)
    two = write_dataset(tmp_path / "two", render_scene, workers=2, **kwargs)
    assert _files(one) == _files(two)  # the manifest's stats too
    assert generation_workers(100) == 1
    monkeypatch.setenv("SAMTUNE_GENERATE_WORKERS", "3")
    assert generation_workers(100) == 3
    monkeypatch.setenv("SAMTUNE_GENERATE_WORKERS", "zero")
    with pytest.raises(ValueError, match="SAMTUNE_GENERATE_WORKERS"):
        generation_workers(1000)
