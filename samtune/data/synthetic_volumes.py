"""Small generated CT-like volumes: the default of ``experiment=medical_volume``.

Each case is a ``D x H x W`` (stored as NIfTI ``X x Y x Z``) volume in Hounsfield-like units: air around
an elliptic body of fat and soft tissue, with three labelled structures that change shape from slice to
slice: 1 an organ (a large smooth blob), 2 a pair of small bright bean-shaped structures (contrast-enhanced),
3 a darker lesion inside the organ. Written with nibabel on first use, deterministic by seed, into the
``volume`` layout (``{split}/images/<case>.nii.gz`` and ``{split}/labels/<case>.nii.gz``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samtune.data.synthetic_common import needs_generation, split_counts, write_generated

GENERATOR = "samtune.data.synthetic_volumes"
VERSION = 1


def _ellipsoid(shape: tuple[int, int, int], centre, radii, rng: np.random.Generator, wobble: float = 0.15) -> np.ndarray:
    """A boolean blob: an ellipsoid with a smooth random radial perturbation (x, y, z order)."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    d = [(x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2]]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    theta = np.arctan2(d[1], d[0])
    phase = rng.uniform(0, 2 * np.pi, 3)
    bump = 1 + wobble * (np.sin(2 * theta + phase[0]) * 0.6 + np.sin(3 * theta + phase[1]) * 0.4) \
        * np.cos(z / shape[2] * np.pi + phase[2])
    return r < bump


def render_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (96, 96, 24)) -> tuple[np.ndarray, np.ndarray]:
    """One volume (float32 HU) and its label map (uint8 0..3), both ``X x Y x Z``."""
    nx, ny, nz = shape
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    cx, cy = nx / 2 + rng.uniform(-4, 4), ny / 2 + rng.uniform(-4, 4)
    body = _ellipsoid(shape, (cx, cy, nz / 2), (nx * rng.uniform(0.38, 0.45), ny * rng.uniform(0.30, 0.38), nz * 3),
                      rng, 0.05)
    hu[body] = -90.0  # fat
    inner = _ellipsoid(shape, (cx, cy, nz / 2), (nx * 0.33, ny * 0.26, nz * 3), rng, 0.08)
    hu[inner & body] = 35.0  # soft tissue
    organ = _ellipsoid(shape, (cx - nx * rng.uniform(0.08, 0.14), cy - ny * 0.04, nz * rng.uniform(0.4, 0.6)),
                       (nx * rng.uniform(0.13, 0.18), ny * rng.uniform(0.10, 0.14), nz * rng.uniform(0.35, 0.5)), rng)
    organ &= inner
    hu[organ], labels[organ] = 60.0, 1
    for side in (-1, 1):
        kidney = _ellipsoid(shape, (cx + side * nx * rng.uniform(0.17, 0.21), cy + ny * rng.uniform(0.08, 0.12),
                                    nz * rng.uniform(0.35, 0.65)),
                            (nx * 0.05, ny * 0.07, nz * rng.uniform(0.2, 0.3)), rng, 0.2)
        kidney &= inner & ~organ
        hu[kidney], labels[kidney] = 170.0, 2
    if rng.random() < 0.85:
        idx = np.argwhere(organ)
        if len(idx):
            c = idx[rng.integers(len(idx))]
            lesion = _ellipsoid(shape, c, (rng.uniform(2.5, 5), rng.uniform(2.5, 5), rng.uniform(1.5, 3)), rng, 0.2)
            lesion &= organ
            hu[lesion], labels[lesion] = 15.0, 3
    hu += rng.normal(0, 12, shape).astype(np.float32)
    return hu, labels


def ensure_volume_dataset(out_dir: str | Path, *, n_train: int = 8, n_val: int = 2, n_test: int = 4,
                          seed: int = 0) -> Path:
    """Write the generated volumes unless ``out_dir/DONE.json`` records the same parameters; return ``out_dir``."""
    import nibabel as nib

    out_dir = Path(out_dir).absolute()
    counts = split_counts(n_train, n_val, n_test)
    if not needs_generation(out_dir, generator=GENERATOR, version=VERSION, counts=counts, seed=seed):
        return out_dir
    affine = np.diag([1.0, 1.0, 2.5, 1.0])  # 1 x 1 x 2.5 mm voxels

    def write(tmp: Path) -> dict:
        stats = {}
        for split_index, (split, count) in enumerate(counts.items()):
            if count == 0:
                continue
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "labels").mkdir(parents=True)
            for i in range(count):
                hu, labels = render_volume(np.random.default_rng([seed, split_index, i]))
                name = f"{split}_{i:03d}.nii.gz"
                nib.save(nib.Nifti1Image(hu.round().astype(np.int16), affine), tmp / split / "images" / name)
                nib.save(nib.Nifti1Image(labels, affine), tmp / split / "labels" / name)
            stats[split] = {"volumes": count}
        return stats

    return write_generated(out_dir, write, generator=GENERATOR, version=VERSION, counts=counts, seed=seed)
