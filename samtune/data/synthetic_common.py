"""Shared machinery of the synthetic dataset generators: canvas, noise, atomic writing.

A generator supplies ``render(rng) -> (image HxWx3 uint8, instances HxW int32)``; this module
derives one RNG per image from ``(seed, split, index)`` (so every file depends only on the seed
and its position), writes the ``folder`` layout into a temporary sibling folder and renames it
into place, with a ``DONE.json`` manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from samtune.data.errors import DataError
from samtune.utils.cpus import usable_cpus
from samtune.utils.io import temp_dir_beside

SPLITS = ("train", "val", "test")
MANIFEST = "DONE.json"
Renderer = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


class Canvas:
    """A float RGB image plus its instance map, painted object by object.

    Later objects occlude earlier ones: painting an instance reassigns its pixels to it.

    Attributes:
        image: ``HxWx3`` float32, 0..255.
        instances: ``HxW`` int32, 0 = background.
    """

    def __init__(self, image: np.ndarray) -> None:
        self.image = image.astype(np.float32)
        self.instances = np.zeros(image.shape[:2], np.int32)
        self._next_id = 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def blank(self) -> np.ndarray:
        """A zero ``HxW`` uint8 buffer to draw one object's mask into with cv2."""
        return np.zeros(self.shape, np.uint8)

    def paint(self, mask: np.ndarray, color: Any, *, instance: bool, alpha: float = 1.0,
              box: tuple[int, int, int, int] | None = None) -> int:
        """Paint ``color`` where ``mask`` is set.

        Args:
            mask: ``hxw`` bool or uint8 (non-zero = object); the whole canvas, or the ``box``.
            color: RGB triple, or an ``hxwx3`` array of per-pixel colours.
            instance: Make the object a new instance (otherwise it is background clutter and
                leaves the instance map unchanged).
            alpha: Opacity.
            box: ``(x, y, w, h)`` of the region ``mask`` covers; None for the whole canvas.

        Returns:
            The new instance id, or 0.
        """
        col = np.asarray(color, np.float32)
        if box is None:  # crop to the object so painting costs its size, not the canvas's
            box = cv2.boundingRect(np.ascontiguousarray(mask, dtype=np.uint8))
            mask = mask[box[1]:box[1] + box[3], box[0]:box[0] + box[2]]
            col = col[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] if col.ndim == 3 else col
        region = np.s_[box[1]:box[1] + box[3], box[0]:box[0] + box[2]]
        image, instances = self.image[region], self.instances[region]
        sel = mask.astype(bool)
        col = col[sel] if col.ndim == 3 else col
        image[sel] = image[sel] * (1.0 - alpha) + col * alpha
        if not instance:
            return 0
        new_id = self._next_id
        self._next_id += 1
        instances[sel] = new_id
        return new_id

    def finish(self, rng: np.random.Generator, *, noise: float, blur: float,
               min_area: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Add sensor noise and blur, drop instances under ``min_area`` px, renumber ``1..N``.

        Returns:
            ``(image HxWx3 uint8, instances HxW int32)``.
        """
        image = self.image + rng.normal(0.0, noise, self.image.shape).astype(np.float32)
        if blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), blur)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        areas = np.bincount(self.instances.ravel())
        keep = np.flatnonzero(areas >= min_area)
        keep = keep[keep > 0]
        lut = np.zeros(areas.size, np.int32)
        lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
        return image, lut[self.instances]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise: a coarse normal grid upsampled bicubically.

    Args:
        rng: Random generator.
        shape: ``(H, W)``.
        cell: Approximate feature size in pixels.

    Returns:
        ``HxW`` float32, roughly zero mean, unit spread.
    """
    height, width = shape
    coarse = rng.normal(size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def linear_gradient(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """A multiplicative illumination ramp ``1 +- strength/2`` in a random direction, ``HxW``."""
    height, width = shape
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0) - 0.5
    return 1.0 + strength * ramp


def random_size(rng: np.random.Generator, low: int = 192, high: int = 320) -> tuple[int, int]:
    """``(H, W)`` drawn independently from ``low..high`` inclusive (images are not square)."""
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_dataset(manifest: dict[str, Any] | None, generator: str, version: int, params: dict[str, Any]) -> bool:
    return (manifest is not None and manifest.get("generator") == generator
            and manifest.get("version") == version and manifest.get("params") == params)


def _replaceable(out_dir: Path) -> bool:
    """Whether ``out_dir`` may be replaced: absent, empty, or written by a samtune generator."""
    if not out_dir.exists():
        return True
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return True
    manifest = _read_manifest(out_dir)
    return manifest is not None and str(manifest.get("generator", "")).startswith("samtune.data.synthetic")


def _install(tmp: Path, out_dir: Path, generator: str, version: int, params: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``out_dir``, moving an old generated dataset out of the way first."""
    for _ in range(5):
        try:
            os.rename(tmp, out_dir)
            return
        except OSError:
            if _same_dataset(_read_manifest(out_dir), generator, version, params):
                shutil.rmtree(tmp, ignore_errors=True)  # another process just wrote the same data
                return
            if not _replaceable(out_dir):
                raise DataError.at(out_dir, "exists and was not written by a samtune generator; "
                                            "refusing to overwrite it") from None
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out_dir, trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    raise DataError.at(out_dir, "could not move the generated dataset into place")


def _params(counts: dict[str, int], seed: int, options: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters a manifest records: images per split, seed and the generator's own options."""
    return {**{f"n_{split}": int(n) for split, n in counts.items()}, "seed": int(seed), **(options or {})}


def write_generated(out_dir: str | Path, write: Callable[[Path], dict], *, generator: str, version: int,
                    counts: dict[str, int], seed: int, options: dict[str, Any] | None = None) -> Path:
    """Write a generated dataset atomically: ``write(tmp)`` fills a temporary sibling of ``out_dir`` and returns
    its stats, ``DONE.json`` records generator, version, parameters (with the generator's ``options``) and stats,
    then the folder is renamed to ``out_dir``. An existing ``out_dir`` is replaced only if a samtune generator
    wrote it.
    """
    out_dir = Path(out_dir).absolute()
    if not _replaceable(out_dir):
        raise DataError.at(out_dir, "exists and was not written by a samtune generator; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    params = _params(counts, seed, options)
    tmp = temp_dir_beside(out_dir)
    try:
        stats = write(tmp)
        manifest = {"generator": generator, "version": version, "params": params, "stats": stats}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _install(tmp, out_dir, generator, version, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _render_one(render: Renderer, seed: int, split_index: int, index: int, options: dict[str, Any],
                images: Path, masks: Path, name: str) -> int:
    """Render image ``index`` of a split and write its two PNGs; returns its number of instances."""
    image, instances = render(np.random.default_rng([seed, split_index, index]), **options)
    Image.fromarray(image).save(images / name, format="PNG")
    Image.fromarray(instances.astype(np.uint16)).save(masks / name, format="PNG")
    return int(instances.max())


def generation_workers(total: int) -> int:
    """Processes that render a dataset of ``total`` images: ``SAMTUNE_GENERATE_WORKERS`` if set, else one per
    usable CPU (at most 16), and 1 below 256 images (where starting processes costs more than it saves)."""
    env = os.environ.get("SAMTUNE_GENERATE_WORKERS")
    if env is not None:
        try:
            workers = int(env)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValueError(f"SAMTUNE_GENERATE_WORKERS must be a positive integer, got {env!r}")
        return workers
    if total < 256:
        return 1
    cpus = usable_cpus()
    return max(1, min(cpus, 16))


def write_dataset(out_dir: str | Path, render: Renderer, *, generator: str, version: int,
                  counts: dict[str, int], seed: int, options: dict[str, Any] | None = None,
                  workers: int | None = None) -> Path:
    """Generate a dataset in the ``folder`` layout, atomically (see :func:`write_generated`).

    Writes ``{split}/images/<split>_<i>.png`` (RGB) and ``{split}/masks/<split>_<i>.png``
    (uint16 instance ids) and ``DONE.json``. Every image has its own RNG, so the files are the same whatever
    the number of ``workers``.

    Args:
        out_dir: Dataset folder.
        render: ``rng -> (image HxWx3 uint8, instances HxW int32)``, a module-level function (it is sent to
            worker processes).
        generator: Generator name recorded in the manifest.
        version: Generator version (bump when the output changes).
        counts: Images per split.
        seed: Base seed; image ``i`` of split ``s`` uses ``default_rng([seed, s, i])``.
        options: Keyword arguments of ``render`` beyond the RNG (recorded in the manifest).
        workers: Rendering processes; ``None``: :func:`generation_workers`.

    Returns:
        ``out_dir``.
    """
    opts = dict(options or {})
    n_workers = generation_workers(sum(counts.values())) if workers is None else int(workers)

    def write(tmp: Path) -> dict:
        jobs = []
        for split_index, (split, count) in enumerate(counts.items()):
            images, masks = tmp / split / "images", tmp / split / "masks"
            images.mkdir(parents=True)
            masks.mkdir(parents=True)
            jobs += [(split, (render, seed, split_index, i, opts, images, masks, f"{split}_{i:04d}.png"))
                     for i in range(count)]
        if n_workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold OpenMP / torch thread pools that a forked child cannot use
            with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                totals = list(pool.map(_render_one, *zip(*(args for _, args in jobs)), chunksize=16))
        else:
            totals = [_render_one(*args) for _, args in jobs]
        stats = {split: {"images": count, "instances": 0} for split, count in counts.items()}
        for (split, _), total in zip(jobs, totals):
            stats[split]["instances"] += total
        return stats

    return write_generated(out_dir, write, generator=generator, version=version, counts=counts, seed=seed,
                           options=options)


def needs_generation(out_dir: str | Path, *, generator: str, version: int, counts: dict[str, int], seed: int,
                     options: dict[str, Any] | None = None) -> bool:
    """Whether ``out_dir`` lacks a ``DONE.json`` matching these parameters."""
    return not _same_dataset(_read_manifest(Path(out_dir)), generator, version, _params(counts, seed, options))


def split_counts(n_train: int, n_val: int, n_test: int) -> dict[str, int]:
    """Images per split, in the order the splits are generated."""
    return {"train": int(n_train), "val": int(n_val), "test": int(n_test)}


def ensure_generated(out_dir: str | Path, render: Renderer, *, generator: str, version: int,
                     defaults: dict[str, Any], params: dict[str, Any]) -> Path:
    """Generate a dataset unless ``out_dir/DONE.json`` records the same generator, version and parameters.

    Args:
        out_dir: Dataset folder.
        render: ``rng -> (image, instances)`` of the generator.
        generator: Generator name recorded in the manifest.
        version: Generator version.
        defaults: Default ``n_train``, ``n_val``, ``n_test``, ``seed`` and the generator's own options
            (keyword arguments of ``render``).
        params: Overrides of ``defaults`` (``data.generator_params``); an unknown key is an error.

    Returns:
        ``out_dir`` (absolute).
    """
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"data.generator_params: unknown key(s) {unknown} for {generator}; "
                         f"known: {sorted(defaults)}")
    full = {**defaults, **params}
    counts = split_counts(full["n_train"], full["n_val"], full["n_test"])
    options = {k: v for k, v in full.items() if k not in ("n_train", "n_val", "n_test", "seed")}
    if needs_generation(out_dir, generator=generator, version=version, counts=counts, seed=full["seed"],
                        options=options):
        return write_dataset(out_dir, render, generator=generator, version=version, counts=counts,
                             seed=full["seed"], options=options)
    return Path(out_dir).absolute()
