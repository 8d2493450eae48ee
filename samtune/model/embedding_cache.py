"""On-disk cache of image embeddings, for training with a frozen image encoder.

With ``finetune=decoder_only`` the image encoder never changes, so each image's embedding is computed
once and stored (float16) under ``cache.dir``; later epochs and later runs read it back instead of
running the encoder, which is by far the most expensive step (see ``scripts/benchmark.py``).

What an entry depends on, and so what its key is made of:

* the **namespace** (one folder per namespace): a hash of the image encoder's weights (every tensor of
  its state dict: names, dtypes, shapes and bytes, hashed once per run), the model type and
  architecture, the preprocessing (input side, pixel mean/std, ``PREPROCESS_VERSION``) and the compute
  precision; ``meta.json`` in the folder spells them out;
* the **image**: :func:`samtune.data.transforms.image_content_key`, a hash of the resized RGB pixels
  that the encoder sees, so a changed file (or a different augmented view) is a different entry.

A changed checkpoint, image or preprocessing therefore never reuses a stale entry. Each file carries
a header with its key, shape, dtype and a blake2b digest of its payload; an entry that fails any check
(truncated, corrupt, another shape) is recomputed and rewritten with a warning. Writers write a unique
temporary file in the entry's folder and ``os.replace`` it into place, so concurrent writers (DDP
ranks, two runs) and readers never see a half-written entry; the last writer wins with identical bytes.

Layout: ``<dir>/<namespace>/<key[:2]>/<key>.emb``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samtune.data.transforms import PIXEL_MEAN, PIXEL_STD, PREPROCESS_VERSION
from samtune.model.build import resolve_arch
from samtune.model.checkpoint import weights_fingerprint
from samtune.utils.io import temp_file_beside

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"SAMEMB1\n"
_HEADER_LEN = struct.Struct("<I")


class CorruptEntryError(ValueError):
    """An entry that cannot be trusted (truncated, wrong key/shape/dtype, digest mismatch)."""


def _encode_entry(key: str, embedding: torch.Tensor) -> bytes:
    payload = np.ascontiguousarray(embedding.detach().to("cpu", torch.float16).numpy())
    header = {
        "key": key, "shape": list(payload.shape), "dtype": "float16",
        "digest": hashlib.blake2b(payload.data, digest_size=16).hexdigest(),
    }
    head = json.dumps(header).encode()
    return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload.tobytes()


def _decode_entry(data: bytes, key: str, expected_shape: tuple[int, ...] | None) -> torch.Tensor:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEADER_LEN.size:
        raise CorruptEntryError("not an embedding-cache entry (bad magic or truncated header)")
    start = len(MAGIC) + _HEADER_LEN.size
    (head_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start : start + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict) or header.get("key") != key or header.get("dtype") != "float16":
        raise CorruptEntryError(f"header does not describe a float16 embedding of {key}")
    shape = tuple(int(s) for s in header.get("shape") or ())
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CorruptEntryError(f"shape {shape}, expected {tuple(expected_shape)}")
    payload = data[start + head_len :]
    if len(payload) != 2 * int(np.prod(shape)):
        raise CorruptEntryError(f"payload is {len(payload)} bytes, expected {2 * int(np.prod(shape))} (truncated?)")
    if hashlib.blake2b(payload, digest_size=16).hexdigest() != header.get("digest"):
        raise CorruptEntryError("payload digest mismatch")
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float16).reshape(shape).copy())


class EmbeddingCache:
    """Image embeddings of one frozen encoder on disk, keyed by image content.

    Build one with :meth:`for_model`; then either :meth:`get_or_compute` (one image, e.g. evaluation) or
    :meth:`embed_batch` (a training batch: only the images not on disk go through the encoder, in one call).
    ``hits``, ``computed`` and ``corrupt`` count what happened since construction.

    Args:
        root: Cache folder (``cache.dir``); created on first write.
        namespace: Everything besides the image that the embeddings depend on (JSON-serialisable);
            its hash names the sub-folder, so different models or preprocessing never share entries.
        expected_shape: ``C x h x w`` of one embedding, checked on every read (None: any shape).
    """

    def __init__(self, root: str | os.PathLike, *, namespace: Mapping[str, Any],
                 expected_shape: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.namespace = dict(namespace)
        text = json.dumps(self.namespace, sort_keys=True)
        self.namespace_id = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
        self.dir = self.root / self.namespace_id
        self.expected_shape = tuple(int(s) for s in expected_shape) if expected_shape is not None else None
        self.hits = self.computed = self.corrupt = 0
        self._writable = True
        self._meta_written = False

    @classmethod
    def for_model(cls, root: str | os.PathLike, encoder: nn.Module, *, model_type: str,
                  arch: Mapping | None = None, precision: str = "32-true") -> EmbeddingCache:
        """The cache of ``encoder`` (a SAM ``ImageEncoderViT``) with samtune's preprocessing.

        Args:
            root: Cache folder.
            encoder: The frozen image encoder; its weights are hashed here (once).
            model_type: ``model.type`` (``vit_b``, ``sam_tiny``, ...).
            arch: ``model.arch`` overrides.
            precision: Compute precision of the encoder (Lightning's, e.g. ``32-true``, ``bf16-mixed``):
                embeddings computed under autocast differ slightly, so they are kept apart.
        """
        spec = resolve_arch(model_type, dict(arch) if arch else None)
        fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "extra"}
        fields["encoder_global_attn_indexes"] = list(fields["encoder_global_attn_indexes"])
        namespace = {
            "format": FORMAT,
            "model_type": str(model_type),
            "arch": fields,
            "encoder_weights": weights_fingerprint(encoder),
            "preprocess": {"img_size": spec.img_size, "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD),
                           "version": PREPROCESS_VERSION},
            "precision": str(precision),
        }
        grid = spec.img_size // spec.patch_size
        return cls(root, namespace=namespace, expected_shape=(spec.prompt_embed_dim, grid, grid))

    # ------------------------------------------------------------------ entries
    def path(self, key: str) -> Path:
        """File of the entry for image key ``key``."""
        if len(key) < 8 or not key.isalnum():
            raise ValueError(f"embedding cache key must be a hex digest, got {key!r}")
        return self.dir / key[:2] / f"{key}.emb"

    def load(self, key: str) -> torch.Tensor | None:
        """The cached ``C x h x w`` float16 embedding of ``key``, or None (absent, or corrupt: warned)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("Embedding cache: cannot read %s (%s); recomputing it", path, exc)
            return None
        try:
            return _decode_entry(data, key, self.expected_shape)
        except CorruptEntryError as exc:
            self.corrupt += 1
            log.warning("Embedding cache: %s is corrupt (%s); recomputing it", path, exc)
            return None

    def store(self, key: str, embedding: torch.Tensor) -> None:
        """Write the ``C x h x w`` embedding of ``key`` (as float16), atomically.

        A cache that cannot be written (read-only, disk full) is warned about once; training goes on.
        """
        if not self._writable:
            return
        if self.expected_shape is not None and tuple(embedding.shape) != self.expected_shape:
            raise ValueError(f"embedding of shape {tuple(embedding.shape)} does not fit this cache "
                             f"({self.expected_shape})")
        path = self.path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_meta()
            fd, tmp = temp_file_beside(path)
            with os.fdopen(fd, "wb") as f:
                f.write(_encode_entry(key, embedding))
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            self._writable = False
            log.warning("Embedding cache: cannot write under %s (%s); going on without storing embeddings",
                        self.dir, exc)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)

    def _write_meta(self) -> None:
        if self._meta_written:
            return
        meta = self.dir / "meta.json"
        if not meta.exists():
            fd, tmp = temp_file_beside(meta)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.namespace, f, indent=2, sort_keys=True)
            os.replace(tmp, meta)
        self._meta_written = True

    # ------------------------------------------------------------------ lookups
    def get_or_compute(self, key: str, compute_fn: Callable[[], torch.Tensor], *,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """The embedding of one image: read from disk, or ``compute_fn()`` then stored.

        Args:
            key: :func:`samtune.data.transforms.image_content_key` of the resized image.
            compute_fn: Returns the image's embedding, ``1 x C x h x w`` (what ``PromptableSam.embed``
                returns for one image) or ``C x h x w``; called only on a miss.
            device: Where to put a cached embedding (a computed one stays where ``compute_fn`` put it);
                default CPU.

        Returns:
            ``1 x C x h x w`` float32; float16-rounded also when just computed, so that a hit and a miss
            give the same numbers.
        """
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            return cached.to(device or "cpu", torch.float32).unsqueeze(0)
        embedding = compute_fn().detach()
        if embedding.ndim == 4:
            if embedding.shape[0] != 1:
                raise ValueError(f"compute_fn must return one embedding, got shape {tuple(embedding.shape)}")
            embedding = embedding[0]
        half = embedding.to(torch.float16)
        self.store(key, half)
        self.computed += 1
        return half.to(torch.float32).unsqueeze(0)

    def embed_batch(self, keys: Sequence[str], images: torch.Tensor,
                    encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Embeddings of a batch: cached rows from disk, the rest from one ``encode`` call, then stored.

        Args:
            keys: B image keys (``batch["cache_key"]``).
            images: ``B x 3 x S x S`` encoder inputs (only the rows not cached are encoded).
            encode: The frozen encoder, ``B' x 3 x S x S -> B' x C x h x w``.

        Returns:
            ``B x C x h x w`` float32 on ``images.device`` (float16-rounded, hit or miss).
        """
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} cache keys for {len(images)} images")
        out: list[torch.Tensor | None] = [self.load(k) for k in keys]
        first_missing: dict[str, int] = {}
        for i, (key, emb) in enumerate(zip(keys, out)):
            if emb is None:
                first_missing.setdefault(key, i)
        self.hits += sum(emb is not None for emb in out)
        if first_missing:
            rows = list(first_missing.values())
            with torch.no_grad():
                computed = encode(images[rows]).detach().to(torch.float16)
            by_key = {key: computed[j] for j, key in enumerate(first_missing)}
            for key, embedding in by_key.items():
                self.store(key, embedding)
            out = [by_key[k] if emb is None else emb for k, emb in zip(keys, out)]
            self.computed += len(rows)
        # float32 before stacking: under bf16 autocast, torch.stack refuses float16 inputs
        return torch.stack([emb.to(images.device, torch.float32) for emb in out])

    def stats(self) -> dict[str, int]:
        """``{"hits", "computed", "corrupt"}`` since construction."""
        return {"hits": self.hits, "computed": self.computed, "corrupt": self.corrupt}
