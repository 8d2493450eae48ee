"""Medical volumes: reading (NIfTI, DICOM), checks, slicing, intensity presets, 3-D Dice, and train.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from samtune.data.errors import DataError
from samtune.data.volumes import (
    SliceSettings,
    ensure_volume_slices,
    map_path,
    read_manifest,
    read_volume,
    scan_volumes,
    to_uint8,
    volume_dice,
)
from tests.test_train_e2e import ROOT, run


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def _case(root: Path, split: str, case: str, *, shape=(20, 24, 6), label_fn=None, seed=0, suffix=".nii.gz"):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 100, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[4:12, 5:15, 1:4] = 1
    labels[14:18, 2:6, 2:5] = 2
    if label_fn is not None:
        labels = label_fn(labels)
    _save(root / split / "images" / f"{case}{suffix}", image)
    _save(root / split / "labels" / f"{case}{suffix}", labels)
    return image, labels


def test_slicing_writes_labelled_slices_and_a_manifest(tmp_path):
    root = tmp_path / "vol"
    _, labels = _case(root, "train", "a")
    _case(root, "test", "b", seed=1, suffix=".nii")
    out = ensure_volume_slices(root, ["train", "test"], SliceSettings(empty_slice_rate=0.0), tmp_path / "slices")
    manifest = read_manifest(out)
    train = manifest["splits"]["train"]["a"]
    assert [s["index"] for s in train["slices"]] == [1, 2, 3, 4]  # slices 0 and 5 have no foreground
    assert train["slices"][1]["labels"] == [1, 2]
    mask = cv2.imread(str(out / "train" / "masks" / "a_s0002.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, labels[:, :, 2])
    image = cv2.imread(str(out / "train" / "images" / "a_s0002.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (20, 24) and image.dtype == np.uint8
    assert "b" in manifest["splits"]["test"]
    # the same volumes and settings reuse the slices; another setting or a changed volume does not
    assert ensure_volume_slices(root, ["train", "test"], SliceSettings(empty_slice_rate=0.0), tmp_path / "slices") == out
    kept = ensure_volume_slices(root, ["train", "test"], SliceSettings(empty_slice_rate=1.0), tmp_path / "slices")
    assert kept != out and len(read_manifest(kept)["splits"]["train"]["a"]["slices"]) == 6
    assert len(read_manifest(kept)["splits"]["test"]["b"]["slices"]) == 4  # evaluation keeps labelled slices only
    _case(root, "train", "a", seed=5)
    assert ensure_volume_slices(root, ["train", "test"], SliceSettings(empty_slice_rate=0.0), tmp_path / "slices") != out
    assert (root / "train" / "images" / "a.nii.gz").is_file()  # the user's files are only read


def test_axis_is_configurable(tmp_path):
    root = tmp_path / "vol"
    _case(root, "train", "a")
    out = ensure_volume_slices(root, ["train"], SliceSettings(axis=0, empty_slice_rate=0.0), tmp_path / "s")
    slices = read_manifest(out)["splits"]["train"]["a"]["slices"]
    assert [s["index"] for s in slices] == [4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 17]
    image = cv2.imread(str(out / slices[0]["file"]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (24, 6)


def test_intensity_presets():
    ct = np.array([[[-1000, -160, 40, 240, 3000]]], np.float32)
    np.testing.assert_array_equal(to_uint8(ct, SliceSettings(intensity="ct", window_level=40, window_width=400)),
                                  [[[0, 0, 128, 255, 255]]])
    mr = np.concatenate([np.zeros(50), np.linspace(1, 100, 100)]).reshape(1, 1, -1).astype(np.float32)
    out = to_uint8(mr, SliceSettings(intensity="mr", percentiles=(0.0, 100.0)))
    assert out[0, 0, :50].max() == 0 and out[0, 0, 50] == 0 and out[0, 0, -1] == 255
    assert to_uint8(np.full((2, 2, 2), 7.0), SliceSettings(intensity="minmax")).max() == 0
    with pytest.raises(ValueError, match="data.volume.intensity"):
        SliceSettings(intensity="pet")
    with pytest.raises(ValueError, match="data.volume.axis"):
        SliceSettings(axis=3)


def test_bad_volumes_get_clear_errors(tmp_path):
    root = tmp_path / "vol"
    _case(root, "train", "a")
    _save(root / "train" / "images" / "lonely.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match="lonely.nii.gz.*volume without label map"):
        scan_volumes(root, "train")

    root = tmp_path / "shape"
    _case(root, "train", "a")
    _save(root / "train" / "labels" / "a.nii.gz", np.zeros((20, 24, 5), np.uint8))
    with pytest.raises(DataError, match=r"labels/a.nii.gz.*shape \(20, 24, 5\) but volume .*\(20, 24, 6\)"):
        ensure_volume_slices(root, ["train"], SliceSettings(), tmp_path / "s")

    root = tmp_path / "float"
    _case(root, "train", "a", label_fn=lambda lab: lab.astype(np.float32) * 0.5)
    with pytest.raises(DataError, match="a.nii.gz.*non-integer values"):
        ensure_volume_slices(root, ["train"], SliceSettings(), tmp_path / "s")

    root = tmp_path / "broken"
    _case(root, "train", "a")
    (root / "train" / "images" / "a.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="images/a.nii.gz.*cannot read NIfTI volume"):
        ensure_volume_slices(root, ["train"], SliceSettings(), tmp_path / "s")

    with pytest.raises(DataError, match="labels.*folder not found"):
        (tmp_path / "nolabels" / "train" / "images").mkdir(parents=True)
        scan_volumes(tmp_path / "nolabels", "train")
    assert not list((tmp_path / "s").glob(".*"))  # no half-written slice folders left behind


def _write_dicom_series(folder: Path, volume: np.ndarray) -> None:
    """``volume`` is Z x rows x cols; one file per slice."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k, plane in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series, study, "CT"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 2
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2 * k], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber, ds.RescaleIntercept, ds.RescaleSlope = k + 1, 0, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{k}.dcm"), enforce_file_format=True)


def test_dicom_series_folder(tmp_path):
    zyx = np.random.default_rng(0).integers(-500, 500, (5, 12, 16)).astype(np.int16)
    _write_dicom_series(tmp_path / "vol" / "train" / "images" / "case1", zyx)
    xyz = zyx.transpose(2, 1, 0)  # MONAI returns DICOM as columns x rows x slices, like NIfTI's X x Y x Z
    np.testing.assert_array_equal(read_volume(tmp_path / "vol" / "train" / "images" / "case1"), xyz)
    labels = np.zeros(xyz.shape, np.uint8)
    labels[3:9, 2:7, 1:3] = 4
    _save(tmp_path / "vol" / "train" / "labels" / "case1.nii.gz", labels)
    (case,) = scan_volumes(tmp_path / "vol", "train")
    assert case.case == "case1" and case.image.is_dir()
    out = ensure_volume_slices(tmp_path / "vol", ["train"], SliceSettings(empty_slice_rate=0), tmp_path / "s")
    assert [s["labels"] for s in read_manifest(out)["splits"]["train"]["case1"]["slices"]] == [[4], [4]]


def test_volume_dice_stacks_slice_predictions(tmp_path):
    root = tmp_path / "vol"
    _, labels = _case(root, "test", "a")
    out = ensure_volume_slices(root, ["test"], SliceSettings(), tmp_path / "s")
    manifest = read_manifest(out)
    maps = tmp_path / "maps"
    for s in manifest["splits"]["test"]["a"]["slices"]:
        truth = labels[:, :, s["index"]]
        inst = np.zeros(truth.shape, np.uint16)
        for k, value in enumerate(s["labels"], start=1):
            inst[truth == value] = k
        if s["index"] == 2:
            inst[inst == 2] = 0  # one slice misses label 2
        path = map_path(maps, s["file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), inst)
    result = volume_dice(manifest, "test", maps)
    lab2 = int((labels == 2).sum())
    missed = int((labels[:, :, 2] == 2).sum())
    expected2 = 2 * (lab2 - missed) / (2 * lab2 - missed)
    per = result["per_volume"]["a"]
    assert per["labels"]["1"] == 1.0 and per["labels"]["2"] == pytest.approx(expected2, abs=1e-6)
    assert result["dice3d"] == pytest.approx((1 + expected2) / 2, abs=1e-6) and result["n_volumes"] == 1
    empty = volume_dice(manifest, "test", tmp_path / "nothing")
    assert empty["dice3d"] == 0.0


def test_train_medical_volume_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    run([
        "python", str(ROOT / "train.py"), "experiment=medical_volume", "debug=tiny", f"data.root={tmp_path / 'vol'}",
        "data.generator_params.n_train=1", "data.generator_params.n_val=1", "data.generator_params.n_test=1",
        f"data.volume.slices_dir={tmp_path / 'slices'}", "data.batch_size=2", "data.max_instances=2",
        "eval.modes=[box]", f"hydra.run.dir={run_dir}",
    ])
    report = json.loads((run_dir / "report.json").read_text())
    volumes = report["volumes"]
    assert volumes["mode"] == "box"
    for name in ("zero_shot", "finetuned"):
        assert volumes[name]["n_volumes"] == 1 and 0.0 <= volumes[name]["dice3d"] <= 1.0
        assert set(volumes[name]["per_volume"]["test_000"]["labels"]) <= {"1", "2", "3"}
    assert "3-D Dice" in (run_dir / "report.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/finetuned/dice3d" in metrics
    assert (tmp_path / "vol" / "DONE.json").is_file()  # the generated NIfTI default


def test_volume_config_errors(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, str(ROOT / "train.py"), "experiment=medical_volume", f"data.root={tmp_path / 'vol'}",
            "data.generator_params.n_train=1", "data.generator_params.n_val=0", "data.generator_params.n_test=1",
            f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"]
    proc = subprocess.run([*args, "data.binary_as_one_object=false"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "data.binary_as_one_object must be true" in proc.stderr
    proc = subprocess.run([*args, "+data.volume.window=3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "data.volume: unknown keys ['window']" in proc.stderr
