"""Write the run's report: ``report.json``, ``instances.jsonl``, ``report.md`` and overlay pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from samtune.data.records import ImageRecord, load_record
from samtune.evaluation.evaluator import EvalResult
from samtune.utils.io import atomic_write_json, atomic_write_text

MODE_TITLES = {"box": "box", "point1": "1 point", "point3": "3 points"}


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def colorize(instances: np.ndarray, seed: int = 0) -> np.ndarray:
    """H x W instance map -> H x W x 4 RGBA overlay, one colour per id, largest instances drawn first."""
    rgba = np.zeros((*instances.shape, 4), np.float32)
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.2, 1.0, size=(max(int(instances.max(initial=0)) + 1, 1), 3))
    for i in ids[np.argsort(-counts)]:
        rgba[instances == i, :3] = palette[i]
        rgba[instances == i, 3] = 0.55
    return rgba


def save_overlays(
    out_dir: Path,
    records: list[ImageRecord],
    results: dict[str, EvalResult],
    *,
    mode: str = "box",
    binary_as_one_object: bool = False,
) -> list[Path]:
    """One picture per image: ground truth, then each model's predicted masks for ``mode`` prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        panels = [(name, res.masks[record.rel_path][mode]) for name, res in results.items() if record.rel_path in res.masks]
        if not panels:
            continue
        image, gt = load_record(record, binary_as_one_object=binary_as_one_object)
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4), squeeze=False)
        for ax, (title, inst) in zip(axes[0], [("ground truth", gt), *panels]):
            ax.imshow(image)
            ax.imshow(colorize(inst))
            ax.set_title(f"{title} ({MODE_TITLES.get(mode, mode)})" if title != "ground truth" else title)
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / (record.rel_path.replace("/", "__").rsplit(".", 1)[0] + ".png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def write_instances(path: Path, results: dict[str, EvalResult]) -> None:
    """All per-instance rows of all models as JSON lines (atomically)."""
    lines = [json.dumps(row) for res in results.values() for row in res.rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def write_report(
    run_dir: Path,
    results: dict[str, EvalResult],
    *,
    skipped_files: list[dict],
    meta: dict,
    overlays: list[Path] = (),
) -> dict:
    """Write ``report.json``, ``instances.jsonl`` and ``report.md`` into ``run_dir``; return the JSON."""
    report: dict = {name: res.summary for name, res in results.items()}
    report["skipped_files"] = list(skipped_files)
    report["meta"] = meta
    if "zero_shot" in results and "finetuned" in results:
        report["gain"] = {
            mode: results["finetuned"].summary[mode]["miou"] - results["zero_shot"].summary[mode]["miou"]
            for mode in results["zero_shot"].summary
            if mode in results["finetuned"].summary
        }
    atomic_write_json(run_dir / "report.json", report)
    write_instances(run_dir / "instances.jsonl", results)

    names = list(results)
    modes = list(next(iter(results.values())).summary) if results else []
    lines = [
        f"# samtune report: {meta.get('experiment') or 'run'}",
        "",
        f"- data: `{meta.get('data_root')}` ({meta.get('split')} split, {meta.get('n_images')} images)",
        f"- model: `{meta.get('model_type')}` from `{meta.get('checkpoint')}`",
        f"- prompts: `{meta.get('prompts_file')}` (seed {meta.get('prompt_seed')}), identical for every model",
        f"- evaluation: {meta.get('eval_note', 'full image')}",
        "",
        "| prompt | " + " | ".join(f"{n} mIoU | {n} Dice" for n in names) + (" | gain (mIoU) |" if "gain" in report else " |"),
        "|---|" + "---|---|" * len(names) + ("---|" if "gain" in report else ""),
    ]
    for mode in modes:
        cells = " | ".join(f"{_fmt(results[n].summary[mode]['miou'])} | {_fmt(results[n].summary[mode]['dice'])}" for n in names)
        gain = f" | {report['gain'][mode]:+.3f} |" if "gain" in report else " |"
        n = results[names[0]].summary[mode]["n"]
        lines.append(f"| {MODE_TITLES.get(mode, mode)} (n={n}) | {cells}{gain}")
    lines += ["", "Box and three-point prompts use SAM's single-mask output; one point the multimask output with "
              "the highest predicted IoU.", ""]
    if skipped_files:
        lines += [f"## Skipped files ({len(skipped_files)})", ""]
        lines += [f"- `{s['file']}`: {s['reason']}" for s in skipped_files] + [""]
    if overlays:
        lines += ["## Overlays (box prompts)", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in overlays] + [""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return report
