"""The embedding cache: keys, validation of entries, concurrent writers, and training without encoder work."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os

import lightning as L
import numpy as np
import pytest
import torch

from samtune.data.dataset import SamDataset
from samtune.data.sources import build_records
from samtune.data.transforms import build_augmentation, image_content_key
from samtune.losses import SamLoss
from samtune.model import build_model
from samtune.model.embedding_cache import EmbeddingCache
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.cache_setup import setup_embedding_cache
from samtune.training.datamodule import SamDataModule
from samtune.training.module import SamTuneModule
from tests.blob_data import write_blob_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]



@functools.lru_cache(maxsize=4)
def encoder(seed: int = 0, img_size: int = 256) -> torch.nn.Module:
    arch = {"img_size": img_size} if img_size != 256 else None
    return build_model("sam_tiny", seed=seed, arch=arch).sam.image_encoder.eval()


def make_cache(root, seed: int = 0, img_size: int = 256, precision: str = "32-true") -> EmbeddingCache:
    arch = {"img_size": img_size} if img_size != 256 else None
    return EmbeddingCache.for_model(root, encoder(seed, img_size), model_type="sam_tiny", arch=arch, precision=precision)


def random_embedding(cache: EmbeddingCache, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, *cache.expected_shape, generator=torch.Generator().manual_seed(seed))


def test_get_or_compute_stores_once_and_reads_back_the_same_numbers(tmp_path):
    cache = make_cache(tmp_path)
    key = image_content_key(np.zeros((8, 8, 3), np.uint8))
    emb = random_embedding(cache)
    calls = []
    first = cache.get_or_compute(key, lambda: calls.append(1) or emb)
    second = cache.get_or_compute(key, lambda: calls.append(1) or emb)
    assert calls == [1] and cache.stats() == {"hits": 1, "computed": 1, "corrupt": 0}
    assert first.shape == (1, *cache.expected_shape) and first.dtype == torch.float32
    assert torch.equal(first, second) and torch.equal(first, emb.half().float())  # stored as float16
    assert cache.path(key).is_file() and (cache.dir / "meta.json").is_file()
    # A new cache object on the same folder (a second run) finds it.
    again = make_cache(tmp_path)
    assert torch.equal(again.get_or_compute(key, lambda: pytest.fail("recomputed")), first)


@pytest.mark.parametrize("autocast", [False, True])
def test_embed_batch_under_bf16_autocast_mixes_hits_and_misses(tmp_path, autocast):
    # a GPU run's training step runs under bf16 autocast; float16 entries must not reach torch.stack there
    cache = make_cache(tmp_path)
    keys = [image_content_key(np.full((8, 8, 3), v, np.uint8)) for v in (1, 2, 1)]
    images = torch.zeros(3, 3, 4, 4)
    cache.get_or_compute(keys[0], lambda: random_embedding(cache, 1))  # a hit among misses
    encode = lambda x: torch.randn(len(x), *cache.expected_shape)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = cache.embed_batch(keys, images, encode)
    assert out.dtype == torch.float32 and out.shape == (3, *cache.expected_shape)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], random_embedding(cache, 1)[0].half().float())


def test_changed_weights_image_preprocessing_or_precision_never_reuse_an_entry(tmp_path):
    base = make_cache(tmp_path)
    others = [make_cache(tmp_path, seed=1), make_cache(tmp_path, img_size=128),
              make_cache(tmp_path, precision="bf16-mixed")]
    assert len({base.namespace_id, *(c.namespace_id for c in others)}) == 4
    # The weights are hashed by content: the same weights in another model object give the same namespace.
    same = EmbeddingCache.for_model(tmp_path, build_model("sam_tiny", seed=0).sam.image_encoder, model_type="sam_tiny")
    assert same.namespace_id == base.namespace_id
    tweaked = build_model("sam_tiny", seed=0).sam.image_encoder
    with torch.no_grad():
        tweaked.neck[0].weight[0, 0, 0, 0] += 1e-3
    assert EmbeddingCache.for_model(tmp_path, tweaked, model_type="sam_tiny").namespace_id != base.namespace_id
    image = np.zeros((8, 8, 3), np.uint8)
    changed = image.copy()
    changed[3, 4, 1] = 1
    assert image_content_key(image) != image_content_key(changed)
    assert image_content_key(image) != image_content_key(np.zeros((4, 16, 3), np.uint8))  # same bytes, other shape


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage", "other_shape"])
def test_corrupt_entries_are_recomputed_with_a_warning(tmp_path, caplog, damage):
    cache = make_cache(tmp_path)
    key = image_content_key(np.ones((4, 4, 3), np.uint8))
    emb = random_embedding(cache)
    cache.get_or_compute(key, lambda: emb)
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_payload":
        data[-10] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not an embedding")
    else:
        EmbeddingCache(tmp_path, namespace=cache.namespace).store(key, torch.zeros(4, 2, 2))
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="samtune.model.embedding_cache"):
        out = cache.get_or_compute(key, lambda: emb)
    assert "corrupt" in caplog.text and str(path) in caplog.text
    assert cache.corrupt == 1 and cache.computed == 2
    assert torch.equal(out, emb.half().float())
    assert cache.load(key) is not None  # rewritten intact


def _writer(root: str, namespace: dict, key: str, emb: torch.Tensor, n: int) -> None:
    # emb is float16 already: store() then runs no torch kernel (a forked child must not use torch's thread pool)
    cache = EmbeddingCache(root, namespace=namespace, expected_shape=(256, 16, 16))
    for _ in range(n):
        cache.store(key, emb)


def test_concurrent_writers_never_leave_a_partial_entry(tmp_path):
    namespace = {"test": "concurrent"}
    key = "ab" * 16
    ctx = multiprocessing.get_context("fork")
    embs = [torch.randn(256, 16, 16, generator=torch.Generator().manual_seed(seed)).half() for seed in (0, 1)]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), namespace, key, emb, 150)) for emb in embs]
    for p in procs:
        p.start()
    reader = EmbeddingCache(tmp_path, namespace=namespace, expected_shape=(256, 16, 16))
    seen = 0
    while any(p.is_alive() for p in procs):
        seen += reader.load(key) is not None
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert reader.corrupt == 0 and seen > 0 and reader.load(key) is not None
    assert not [f for f in os.listdir(reader.path(key).parent) if f.endswith(".tmp")]


def test_views_make_augmentation_cacheable(tmp_path):
    records, _ = build_records("folder", write_blob_dataset(tmp_path / "blobs", {"train": 1}), "train")
    aug = build_augmentation("strong")
    plain = SamDataset(records, img_size=256, cache_keys=True)[0]
    # views=1: the augmentation is not applied; every draw is the image as it is.
    one = SamDataset(records, img_size=256, augment=aug, cache_keys=True, views=1)
    assert {one[0]["cache_key"] for _ in range(5)} == {plain["cache_key"]}
    # views=3: at most three distinct images, one of them the original, each with its own consistent masks.
    three = SamDataset(records, img_size=256, augment=aug, cache_keys=True, views=3, max_instances=16)
    np.random.seed(0)
    items = [three[0] for _ in range(30)]
    keys = {it["cache_key"] for it in items}
    assert plain["cache_key"] in keys and 2 <= len(keys) <= 3
    for key in keys:
        same = [it for it in items if it["cache_key"] == key]
        assert all(torch.equal(it["image"], same[0]["image"]) and torch.equal(it["masks"], same[0]["masks"])
                   for it in same)
    # Free augmentation (no cache) keeps drawing new images.
    free = SamDataset(records, img_size=256, augment=aug, cache_keys=True)
    assert len({free[0]["cache_key"] for _ in range(12)}) > 3


def test_cache_config(tmp_path, caplog):
    model = build_model("sam_tiny", seed=0)
    common = dict(model=model, model_type="sam_tiny", arch=None, precision="32-true", zoom_crop=None)
    cfg = {"enabled": "auto", "dir": str(tmp_path), "views": 1}
    assert setup_embedding_cache(cfg, mode="lora", augment="none", **common) == (None, None)
    assert setup_embedding_cache({**cfg, "enabled": False}, mode="decoder_only", augment="none", **common) == (None, None)
    with pytest.raises(ValueError, match="frozen image encoder"):
        setup_embedding_cache({**cfg, "enabled": True}, mode="full", augment="none", **common)
    with caplog.at_level(logging.WARNING):
        cache, views = setup_embedding_cache(cfg, mode="decoder_only", augment="default", **common)
    assert isinstance(cache, EmbeddingCache) and views == 1
    assert "NOT augmented" in caplog.text and "cache.views=K" in caplog.text


def _fit(records, cache_dir, *, seed: int = 0, epochs: int = 2) -> dict:
    """Train sam_tiny (decoder_only, cache on) for ``epochs``; count the images its encoder embeds."""
    model = build_model("sam_tiny", seed=seed)
    cache = EmbeddingCache.for_model(cache_dir, model.sam.image_encoder, model_type="sam_tiny")
    module = SamTuneModule(
        model, simulator=PromptSimulator(PromptPolicy(correction_rounds=0, mask_only_rounds=0)), loss=SamLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mode="decoder_only", embedding_cache=cache,
    )
    data = SamDataModule(records["train"], records["val"], img_size=256, augment="default", batch_size=2,
                         max_instances=2, cache_keys=True, views=1)
    counts = {"images": 0}
    model.sam.image_encoder.register_forward_hook(lambda _m, inputs, _o: counts.__setitem__("images", counts["images"] + len(inputs[0])))
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return {**counts, **cache.stats()}


def test_training_embeds_each_image_once_across_epochs_and_runs(tmp_path):
    root = write_blob_dataset(tmp_path / "blobs", {"train": 3, "val": 2})
    records = {split: build_records("folder", root, split)[0] for split in ("train", "val")}
    first = _fit(records, tmp_path / "cache")
    # 5 distinct images over 2 epochs of train + val: each embedded exactly once, then read from disk.
    assert first["images"] == 5 and first["computed"] == 5 and first["hits"] == 2 * 5 - 5
    second = _fit(records, tmp_path / "cache", epochs=1)
    assert second["images"] == 0 and second["computed"] == 0 and second["hits"] == 5
