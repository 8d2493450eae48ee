"""Training throughput of samtune's fine-tuning modes, one JSON line per setting.

    python scripts/benchmark.py --model sam_tiny
    python scripts/benchmark.py --model vit_b --images 2 --prompts 32          # 1024 px, ~18 s per encoder pass on a CPU
    python scripts/benchmark.py --model vit_b --device cuda --images 16

Settings (random weights, generated images with ``--prompts`` instances each, ``--rounds`` correction rounds):

* ``decoder_only_uncached``: an epoch of ``SamTuneModule.training_step`` + backward + optimizer step, the frozen
  encoder run on every image;
* ``decoder_only_cached``: the same epoch with every embedding already in the embedding cache (a first, untimed
  epoch fills it), so no encoder work;
* ``lora``, ``full``: an epoch with the encoder trained (LoRA adapters / all weights, gradient checkpointing on);
* ``prompts_batched`` / ``prompts_per_prompt``: one image's decoder forward + loss + backward for ``--prompts``
  box prompts, all in one decoder call vs one call per prompt;
* ``zoom`` (only when named in ``--settings``): the zoomed evaluation of experiment=pcb/medical (``eval.zoom=2``, box
  prompts) of one image with ``--prompts`` objects, every prompt in its own crop through the encoder; the line adds
  the crops per encoder call (``--memory-budget-gb``, else derived from the free memory) and the estimated memory of
  one crop, so that its peak memory can be compared across models and numbers of objects.

Each line: images/s, prompts/s (decoded prompts, all rounds), peak memory (``torch.cuda.max_memory_allocated`` on a
GPU, the process's peak RSS during the setting on a CPU). The last line holds the two ratios and their targets:
cached vs uncached epoch speed (>= 20x) and batched vs per-prompt prompts/s (>= 5x).
An uncached epoch starts after ``--warmup`` untimed steps; the cached epoch after an untimed epoch that fills the
cache. On a CPU shared with other jobs, ``--threads 1`` avoids oversubscribed OpenMP threads (README "Benchmark").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from samtune.data.dataset import SamDataset, collate_instances
from samtune.data.records import load_record
from samtune.data.sources import build_records
from samtune.evaluation.evaluator import evaluate_model
from samtune.losses import SamLoss
from samtune.model import ARCHITECTURES, build_model
from samtune.model.embedding_cache import EmbeddingCache
from samtune.model.memory import crop_bytes, crops_per_call
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import PromptGroup, PromptPolicy, PromptSimulator, make_instance_prompts, masks_to_boxes
from samtune.training.finetune_modes import finetune_mode
from samtune.training.module import SamTuneModule

SETTINGS = ("decoder_only_uncached", "decoder_only_cached", "lora", "full", "prompts")
OPTIONAL = ("zoom",)  # run only when named: one encoder pass per object
TARGETS = {"cached_vs_uncached": 20.0, "batched_vs_per_prompt": 5.0}


def write_images(root: Path, n: int, size: int, instances: int, seed: int = 0) -> Path:
    """``n`` images of ``size`` px with ``instances`` shapes each, in the folder layout (split ``train``)."""
    rng = np.random.default_rng(seed)
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "train" / "masks").mkdir(parents=True, exist_ok=True)
    grid = int(np.ceil(np.sqrt(instances)))
    cell = size // grid
    for i in range(n):
        image = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
        ids = np.zeros((size, size), np.uint16)
        for k in range(instances):
            y0, x0 = (k // grid) * cell, (k % grid) * cell
            layer = np.zeros((size, size), np.uint8)
            cy, cx = y0 + cell // 2, x0 + cell // 2
            ry, rx = (int(rng.integers(cell // 5, cell * 2 // 5 + 1)) for _ in range(2))
            if k % 2:
                cv2.ellipse(layer, (cx, cy), (rx, ry), 0, 0, 360, 1, -1)
            else:
                cv2.rectangle(layer, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
            ids[layer > 0] = k + 1
            image[layer > 0] = rng.integers(100, 256, size=3)
        cv2.imwrite(str(root / "train" / "images" / f"img_{i}.png"), image[..., ::-1])
        cv2.imwrite(str(root / "train" / "masks" / f"img_{i}.png"), ids)
    return root


class PeakMemory:
    """Peak CUDA allocation, or peak process RSS (sampled every 5 ms) on a CPU, within a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, proc) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"


@contextlib.contextmanager
def count_forward(module: torch.nn.Module, counts: dict, name: str,
                  size: Callable[[tuple, object], int]) -> Iterator[None]:
    """Add ``size(inputs, output)`` of every forward of ``module`` to ``counts[name]``."""
    def hook(_mod, inputs, output):
        counts[name] += size(inputs, output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def count_images(sam, counts: dict) -> contextlib.AbstractContextManager:
    """Images through the image encoder (its patch embedding runs once per image, checkpointed or not)."""
    return count_forward(sam.image_encoder.patch_embed, counts, "encoded", lambda inputs, _out: len(inputs[0]))


def count_prompts(sam, counts: dict) -> contextlib.AbstractContextManager:
    """Prompts decoded: the batch of every prompt-encoder call (its sparse embeddings are N x K x C)."""
    return count_forward(sam.prompt_encoder, counts, "prompts", lambda _inputs, out: int(out[0].shape[0]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_module(args, mode: str, cache: EmbeddingCache | None) -> SamTuneModule:
    model = build_model(args.model, arch=args.arch, seed=0)
    kind = finetune_mode(mode)
    lora = ({"rank": 8, "alpha": 16, "dropout": 0.0, "blocks": "all", "target_modules": ["qkv"]} if kind.uses_adapters
            else None)
    module = SamTuneModule(
        model, simulator=PromptSimulator(PromptPolicy(correction_rounds=args.rounds, mask_only_rounds=0)),
        loss=SamLoss(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-5), mode=mode, lora=lora,
        gradient_checkpointing=not kind.encoder_frozen, train_prompt_encoder=kind.encoder_weights_train,
        embedding_cache=cache,
    )
    return module.to(args.device)


def run_epoch(args, module: SamTuneModule, loader: Iterable[dict], optimizer: torch.optim.Optimizer, counts: dict) -> float:
    """One timed epoch: data loading, training_step (embed, prompts, decode, loss), backward, step."""
    sam = module.model.sam
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    sync(args.device)
    start = time.perf_counter()
    with count_images(sam, counts), count_prompts(sam, counts):
        for i, batch in enumerate(loader):
            batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast:
                loss = module.training_step(batch, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(args.device)
    return time.perf_counter() - start


def bench_epoch(args, setting: str, records, cache_dir: Path) -> dict:
    mode = "decoder_only" if setting.startswith("decoder_only") else setting
    cached = setting == "decoder_only_cached"
    module = build_module(args, mode, None)
    if cached:
        module.embedding_cache = EmbeddingCache.for_model(
            cache_dir, module.model.sam.image_encoder, model_type=args.model, arch=args.arch,
            precision="bf16" if args.bf16 else "32")
    dataset = SamDataset(records, img_size=module.model.img_size, augment=None, max_instances=args.prompts,
                         cache_keys=cached, views=1 if cached else None)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_instances)
    optimizer = module.configure_optimizers()
    if cached:  # fill the cache (not timed): the timed epoch reads every embedding from disk
        run_epoch(args, module, loader, optimizer, {"encoded": 0, "prompts": 0})
    elif args.warmup:  # first calls of a process or mode are slower (allocations, kernel selection)
        run_epoch(args, module, itertools.islice(loader, args.warmup), optimizer, {"encoded": 0, "prompts": 0})
    counts = {"encoded": 0, "prompts": 0}
    with PeakMemory(args.device) as mem:
        seconds = run_epoch(args, module, loader, optimizer, counts)
    return line(args, setting, seconds, len(dataset), counts, mem)


def bench_prompts(args) -> list[dict]:
    """Decoder forward + loss + backward for ``--prompts`` box prompts of one image: one call vs one per prompt."""
    module = build_module(args, "decoder_only", None)
    sam, size = module.model.sam, module.model.img_size
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embedding = module.embed(torch.randn(1, 3, size, size, generator=gen).to(args.device))
    n, grid = args.prompts, int(np.ceil(np.sqrt(args.prompts)))
    cell = size // grid
    gt = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(n):
        y, x = (k // grid) * cell, (k % grid) * cell
        gt[k, y + cell // 4 : y + 3 * cell // 4, x + cell // 4 : x + 3 * cell // 4] = True
    gt = gt.to(args.device)
    boxes = masks_to_boxes(gt.cpu()).to(args.device)
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(chunks: list[slice]) -> None:
        with autocast:
            losses = []
            for sl in chunks:
                group = PromptGroup(index=torch.arange(n)[sl], boxes=boxes[sl])
                logits, iou = module._decode(embedding, group.to(args.device))
                losses.append(module._loss(logits, iou, gt[sl], multimask=False).loss)
            loss = torch.cat(losses).mean()
        loss.backward()
        sam.mask_decoder.zero_grad(set_to_none=True)

    out = []
    for setting, chunks in (("prompts_batched", [slice(0, n)]), ("prompts_per_prompt", [slice(k, k + 1) for k in range(n)])):
        step(chunks)  # warm-up
        counts = {"encoded": 0, "prompts": 0}
        with PeakMemory(args.device) as mem, count_prompts(sam, counts):
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.reps):
                step(chunks)
            sync(args.device)
            seconds = time.perf_counter() - start
        out.append(line(args, setting, seconds, args.reps, counts, mem, decoder_calls=len(chunks) * args.reps))
    return out


def bench_zoom(args, records) -> dict:
    """Zoomed box evaluation (``evaluate_model`` with ``eval.zoom=2``) of the first image's ``--prompts`` objects."""
    model = build_model(args.model, arch=args.arch, seed=0).to(args.device).eval()
    record = records[0]
    _, instances = load_record(record)
    prompts = {record.rel_path: make_instance_prompts(instances, seed=0, key=record.rel_path)}
    zoom = ZoomConfig(context=2.0, memory_budget_gb=args.memory_budget_gb)
    per_call = crops_per_call(model, instances.shape[:2], zoom.memory_budget_gb)
    counts = {"encoded": 0, "prompts": 0, "encoder_calls": 0}
    sam = model.sam
    with PeakMemory(args.device) as mem, count_images(sam, counts), count_prompts(sam, counts), \
            count_forward(sam.image_encoder, counts, "encoder_calls", lambda _inputs, _out: 1):
        sync(args.device)
        start = time.perf_counter()
        result = evaluate_model(model, [record], prompts, name="bench", modes=["box"], zoom=zoom)
        sync(args.device)
        seconds = time.perf_counter() - start
    return line(args, "zoom", seconds, 1, counts, mem, objects=len(prompts[record.rel_path]),
                crops_per_call=per_call, encoder_calls=counts["encoder_calls"],
                crop_mb_estimated=round(crop_bytes(model, instances.shape[:2]) / 2**20, 1),
                memory_budget_gb=args.memory_budget_gb, box_miou=round(result.summary["box"]["miou"], 4))


def line(args, setting: str, seconds: float, images: int, counts: dict, mem: PeakMemory, **extra) -> dict:
    return {
        "setting": setting, "model": args.model, "img_size": args.img_size, "device": str(args.device),
        "precision": "bf16-mixed" if args.bf16 else "32-true", "images": images, "seconds": round(seconds, 4),
        "images_per_s": round(images / seconds, 4), "prompts": counts["prompts"],
        "prompts_per_s": round(counts["prompts"] / seconds, 3), "images_encoded": counts["encoded"],
        "peak_mem_mb": round(mem.peak_mb, 1), "peak_mem_kind": mem.kind, **extra,
    }


def ratio(lines: dict, a: str, b: str, key: str) -> float | None:
    if a in lines and b in lines and lines[b][key] > 0:
        return round(lines[a][key] / lines[b][key], 2)
    return None


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam_tiny", choices=sorted(ARCHITECTURES))
    p.add_argument("--img-size", type=int, default=None, help="model input side (default: the model's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--images", type=int, default=4, help="images per epoch")
    p.add_argument("--prompts", type=int, default=32, help="instances (prompts) per image")
    p.add_argument("--rounds", type=int, default=0, help="correction-click rounds after the first prompt")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the prompt-batching step")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before each uncached epoch")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated subset of {','.join(SETTINGS + OPTIONAL)} (default: all but {','.join(OPTIONAL)})")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="zoom: eval.memory_budget_gb (default: derived from the free memory)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 prompts, 1 repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.reps = min(args.prompts, 4), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    args.img_size = args.img_size or ARCHITECTURES[args.model].img_size
    args.arch = {"img_size": args.img_size} if args.img_size != ARCHITECTURES[args.model].img_size else None
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS + OPTIONAL))
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS + OPTIONAL)}")
    logging.getLogger("samtune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    lines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="samtune_bench_") as tmp:
        records, _ = build_records("folder", write_images(Path(tmp) / "data", args.images, args.img_size, args.prompts),
                                   "train")
        for setting in settings:
            if setting == "prompts":
                results = bench_prompts(args)
            elif setting == "zoom":
                results = [bench_zoom(args, records)]
            else:
                results = [bench_epoch(args, setting, records, Path(tmp) / "cache")]
            for result in results:
                lines[result["setting"]] = result
                emit(json.dumps(result))
    speedups = {
        "cached_vs_uncached": ratio(lines, "decoder_only_cached", "decoder_only_uncached", "images_per_s"),
        "batched_vs_per_prompt": ratio(lines, "prompts_batched", "prompts_per_prompt", "prompts_per_s"),
    }
    summary = {"setting": "ratios", "model": args.model, "img_size": args.img_size, "device": str(args.device),
               **{k: v for k, v in speedups.items()},
               **{f"{k}_target": t for k, t in TARGETS.items()},
               **{f"{k}_met": (v >= TARGETS[k]) if v is not None else None for k, v in speedups.items()}}
    emit(json.dumps(summary))
    return [*lines.values(), summary]


if __name__ == "__main__":
    main()
