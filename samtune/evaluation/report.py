"""Write the run's report: ``report.json``, ``instances.jsonl`` and ``report.md``.

``report.json``::

    {"zero_shot": {"box": {"miou", "dice", "n"}, "point1": ..., "clicks": {..., "miou_at", "noc85", "noc90"},
                   "auto": {..., "precision50", "recall50"}},
     "finetuned": {...}, "gain": {mode: finetuned - zero_shot mIoU},
     "calibration": {model: {mode: {"spearman", "ece", "n"}}},
     "extra_sets": {set: {"meta", "zero_shot", "finetuned", "gain", "calibration", "skipped_files"}},
     "worst_images": [{"image", "n", model: mean IoU, "overlay"}], "skipped_files": [...], "meta": {...}}
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from samtune.evaluation.evaluator import EvalResult
from samtune.predict.modes import TITLES as MODE_TITLES
from samtune.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CLICK_COLUMNS = (1, 2, 3, 5, 10, 20)


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _clean(obj):
    """NaN -> None, recursively, so that report.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class ExtraSetResult:
    """Results of the models on one ``eval.extra_sets`` entry."""

    meta: dict
    results: dict[str, EvalResult]
    skipped_files: list[dict] = field(default_factory=list)


def gains(results: dict[str, EvalResult]) -> dict[str, float] | None:
    """mode -> fine-tuned minus zero-shot mIoU (None unless both models were evaluated)."""
    if "zero_shot" not in results or "finetuned" not in results:
        return None
    zs, ft = results["zero_shot"].summary, results["finetuned"].summary
    return {m: ft[m]["miou"] - zs[m]["miou"] for m in zs if m in ft}


def per_image_miou(rows: list[dict], model: str, mode: str) -> dict[str, tuple[float, int]]:
    """image -> (mean IoU, number of instances) of ``model``'s rows in ``mode``."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["model"] == model and r["mode"] == mode:
            acc[r["image"]].append(r["iou"])
    return {img: (sum(v) / len(v), len(v)) for img, v in acc.items()}


def worst_images(results: dict[str, EvalResult], mode: str, k: int) -> list[dict]:
    """The ``k`` images with the lowest mean IoU of the last model (fine-tuned if present) in ``mode``.

    Returns:
        ``[{"image", "n", <model>: mean IoU for every model}]``, worst first.
    """
    if k <= 0 or not results:
        return []
    per_model = {name: per_image_miou(res.rows, name, mode) for name, res in results.items()}
    ranked = per_model[list(results)[-1]]
    order = sorted(ranked, key=lambda img: (ranked[img][0], img))[:k]
    return [{"image": img, "n": ranked[img][1], **{n: per_model[n].get(img, (None,))[0] for n in per_model}}
            for img in order]


def write_instances(path: Path, results: dict[str, EvalResult], extra: dict[str, ExtraSetResult] | None = None) -> None:
    """All per-instance rows of all models as JSON lines (atomically); extra sets' rows carry ``"set"``."""
    lines = [json.dumps(_clean(row)) for res in results.values() for row in res.rows]
    for set_name, ex in (extra or {}).items():
        lines += [json.dumps(_clean({**row, "set": set_name})) for res in ex.results.values() for row in res.rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _summary_table(results: dict[str, EvalResult], gain: dict | None) -> list[str]:
    names = list(results)
    modes = list(next(iter(results.values())).summary) if results else []
    lines = [
        "| prompt | " + " | ".join(f"{n} mIoU | {n} Dice" for n in names) + (" | gain (mIoU) |" if gain else " |"),
        "|---|" + "---|---|" * len(names) + ("---|" if gain else ""),
    ]
    for mode in modes:
        s0 = results[names[0]].summary[mode]
        title = MODE_TITLES.get(mode, mode)
        if mode == "clicks":
            title = f"clicks, mIoU@{s0['max_clicks']}"
        elif mode == "auto":
            title = "auto, best IoU per instance"
        cells = " | ".join(f"{_fmt(results[n].summary[mode]['miou'])} | {_fmt(results[n].summary[mode]['dice'])}"
                           for n in names)
        tail = f" | {_fmt(gain.get(mode), signed=True)} |" if gain else " |"
        lines.append(f"| {title} (n={s0['n']}) | {cells}{tail}")
    return lines


def _oracle_section(results: dict[str, EvalResult]) -> list[str]:
    names = [n for n, r in results.items() if "point1_oracle" in r.summary]
    if not names:
        return []
    lines = ["## One point: each multimask output", "",
             "mIoU of the one-point prompts when every prompt takes multimask output 1, 2 or 3; the oracle takes the "
             "best of the three per instance (what the IoU head's choice could reach), and the share says how often "
             "each output is that best one.", "",
             "| model | output 1 | output 2 | output 3 | oracle | IoU head's choice | best-output share 1 / 2 / 3 |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        s = results[n].summary["point1_oracle"]
        out, share = s["output_miou"], s["output_share"]
        chosen = _fmt(results[n].summary["point1"]["miou"]) if "point1" in results[n].summary else "-"
        lines.append(f"| {n} | {_fmt(out['1'])} | {_fmt(out['2'])} | {_fmt(out['3'])} | {_fmt(s['miou'])} | {chosen} | "
                     + " / ".join(f"{share[k]:.2f}" for k in ("1", "2", "3")) + " |")
    return lines + [""]


def _clicks_section(results: dict[str, EvalResult], plot: Path | None, run_dir: Path) -> list[str]:
    clicked = {n: r.summary["clicks"] for n, r in results.items() if "clicks" in r.summary}
    if not clicked:
        return []
    k_max = next(iter(clicked.values()))["max_clicks"]
    ks = [k for k in CLICK_COLUMNS if k <= k_max] + ([k_max] if k_max not in CLICK_COLUMNS else [])
    lines = [f"## Iterative clicks (up to {k_max})", "",
             "Click 1 at the object's centre, then each click at the centre of the largest error region, with the "
             f"previous logits as mask prompt. NoC@85 / NoC@90: clicks to reach 85% / 90% IoU (capped at {k_max}; "
             "an instance that never reaches it counts as the cap); NoF: instances that never reach it.", "",
             "| model | " + " | ".join(f"mIoU@{k}" for k in ks) + " | NoC@85 | NoC@90 | NoF@85 | NoF@90 |",
             "|---|" + "---|" * (len(ks) + 4)]
    for n, s in clicked.items():
        cells = " | ".join(_fmt(s["miou_at"][str(k)]) for k in ks)
        lines.append(f"| {n} | {cells} | {_fmt(s['noc85'])} | {_fmt(s['noc90'])} | {s['nof85']} | {s['nof90']} |")
    if plot is not None:
        lines += ["", f"![mIoU after k clicks]({plot.relative_to(run_dir).as_posix()})"]
    return lines + [""]


def _auto_section(results: dict[str, EvalResult]) -> list[str]:
    auto = {n: r.summary["auto"] for n, r in results.items() if "auto" in r.summary}
    if not auto:
        return []
    lines = ["## Automatic masks (segment everything)", "",
             "SamAutomaticMaskGenerator's masks matched to the ground truth: best IoU of each ground-truth instance "
             "over all masks; precision / recall of a one-to-one matching at IoU >= 0.5.", "",
             "| model | mean best IoU | precision@0.5 | recall@0.5 | F1@0.5 | masks | instances |", "|---|---|---|---|---|---|---|"]
    for n, s in auto.items():
        lines.append(f"| {n} | {_fmt(s['miou'])} | {_fmt(s['precision50'])} | {_fmt(s['recall50'])} | "
                     f"{_fmt(s['f1_50'])} | {s['n_pred']} | {s['n']} |")
    for n, s in auto.items():
        f = s.get("filters")
        if f:
            lines += ["", f"{n}: {f['candidates']} candidate masks, {f['passed_pred_iou']} above the predicted-IoU "
                      f"threshold, {f['passed_both']} of those above the stability threshold (best predicted IoU "
                      f"{f['best_pred_iou']}, best stability {f['best_stability']})."]
        if s.get("why_no_masks"):
            lines += ["", f"**{n}: {s['why_no_masks']}.**"]
    return lines + [""]


def _calibration_section(results: dict[str, EvalResult]) -> list[str]:
    lines = ["## IoU-head calibration", "",
             "Predicted IoU (SAM's IoU head) against the true IoU of each mask: Spearman rank correlation (1 = ranks "
             "masks perfectly) and expected calibration error (ECE, 10 bins; 0 = predicted IoU is the true IoU). "
             "Clicks pool all rounds; auto compares each generated mask with its best-matching instance.", "",
             "| model | mode | Spearman | ECE | n |", "|---|---|---|---|---|"]
    for n, r in results.items():
        for mode, c in r.calibration.items():
            lines.append(f"| {n} | {MODE_TITLES.get(mode, mode)} | {_fmt(c['spearman'])} | {_fmt(c['ece'])} | {c['n']} |")
    return lines + [""]


def _extra_section(extra: dict[str, ExtraSetResult]) -> list[str]:
    if not extra:
        return []
    lines = ["## Forgetting check: other datasets", "",
             "The same models on datasets they were not fine-tuned for (`eval.extra_sets`): a drop here is what "
             "adaptation cost elsewhere.", ""]
    for set_name, ex in extra.items():
        gain = gains(ex.results)
        lines += [f"### {set_name}: `{ex.meta.get('root')}` ({ex.meta.get('split')} split, "
                  f"{ex.meta.get('n_images')} images)", ""]
        lines += _summary_table(ex.results, gain) + [""]
    return lines


def _worst_section(worst: list[dict], names: list[str], mode: str, run_dir: Path) -> list[str]:
    if not worst:
        return []
    lines = [f"## Worst images ({MODE_TITLES.get(mode, mode)} prompts, lowest mean IoU of {names[-1]})", "",
             "| image | instances | " + " | ".join(f"{n} mIoU" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for w in worst:
        lines.append(f"| `{w['image']}` | {w['n']} | " + " | ".join(_fmt(w.get(n)) for n in names) + " |")
    lines.append("")
    lines += [f"![{Path(w['overlay']).stem}]({Path(w['overlay']).relative_to(run_dir).as_posix()})"
              for w in worst if w.get("overlay")]
    return lines + [""]


def engine_json(engine: dict, zero_shot: EvalResult | None) -> dict:
    """``report.json``'s ``engine`` block: one entry per round with ``<mode>_miou`` on the test split."""
    rounds = []
    for r in engine["rounds"]:
        entry = {"round": r["round"], "stage": r["stage"], **{f"{m}_miou": v for m, v in (r.get("test") or {}).items()}}
        for key in ("proposed", "kept", "rejected", "kept_hidden_iou", "kept_precision50", "hidden_objects",
                    "hidden_recall50", "images_proposed", "best_pred_iou", "best_stability", "thresholds",
                    "threshold_choice", "val_min_gain", "kept_previous", "n_train_images", "review"):
            if key in r:
                entry[key] = r[key]
        rounds.append(entry)
    out = {"labeled_images": engine.get("labeled"), "unlabeled_images": engine.get("unlabeled"), "rounds": rounds}
    if zero_shot is not None:
        out["zero_shot"] = {f"{m}_miou": v["miou"] for m, v in zero_shot.summary.items()}
    return out


def _engine_section(engine: dict, run_dir: Path) -> list[str]:
    """Per-round table and a plot of test mIoU over rounds."""
    rounds = engine["rounds"]
    modes = [k[: -len("_miou")] for k in (rounds[0] if rounds else {}) if k.endswith("_miou")]
    lines = [f"## Data engine ({engine.get('labeled_images')} labelled, {engine.get('unlabeled_images')} unlabelled "
             "training images)", "",
             "| round | stage | " + " | ".join(f"{MODE_TITLES.get(m, m)} mIoU" for m in modes)
             + " | masks proposed | kept | rejected | kept masks' IoU with hidden labels | their precision@0.5 |",
             "|---|---|" + "---:|" * (len(modes) + 5)]
    zs = engine.get("zero_shot") or {}
    if zs:
        lines.append("| - | zero-shot | " + " | ".join(_fmt(zs.get(f"{m}_miou")) for m in modes) + " | | | | | |")
    for r in rounds:
        cells = " | ".join(_fmt(r.get(f"{m}_miou")) for m in modes)
        extra = " | ".join("" if r.get(k) is None else (_fmt(r[k]) if k.startswith("kept_") else str(r[k]))
                           for k in ("proposed", "kept", "rejected", "kept_hidden_iou", "kept_precision50"))
        stage = r["stage"] + (" (kept its starting weights)" if r.get("kept_previous") else "")
        lines.append(f"| {r['round']} | {stage} | {cells} | {extra} |")
    lines.append("")
    for r in rounds:
        if r.get("threshold_choice"):
            c = r["threshold_choice"]
            ranking = (f"predicted vs true IoU of the proposals: Spearman {_fmt(c.get('spearman'))}, "
                       f"ECE {_fmt(c.get('ece'))}")
            if c.get("target_iou") is not None and not r.get("thresholds"):
                lines.append(f"Round {r['round']}: no thresholds keep validation proposals of mean IoU >= "
                             f"{c['target_iou']:g} with the labels (the best any pair reached: "
                             f"{_fmt(c.get('best_mean_iou'))}; {ranking}), so it kept no pseudo-label.")
            else:
                aim = (f"{c.get('kept', 0)} kept there at mean IoU {_fmt(c.get('mean_iou'))}, target "
                       f"{c['target_iou']:g}" if c.get("target_iou") is not None else f"F1 {_fmt(c.get('f1'))}")
                lines.append(f"Round {r['round']}: thresholds chosen on validation {r.get('thresholds')} ({aim}; "
                             f"{ranking}).")
        if r.get("review") and (r["review"].get("images_touched") or r["review"].get("simulated")):
            v = r["review"]
            per_fix = f", {v['clicks_per_fix']:g} clicks per fix" if v.get("clicks_per_fix") is not None else ""
            lines.append(f"Round {r['round']}: people's reviews (engine.review) gave {v['accepted']} masks accepted as "
                         f"proposed, {v['fixed']} fixed{per_fix}, {v['added']} added, {v['rejected']} rejected, on "
                         f"{v['images_touched']} images ({v['images_reviewed']} marked done)"
                         + (f"; {v['pseudo_dropped']} pseudo-labels they superseded were not trained on"
                            if v.get("pseudo_dropped") else "") + ".")
            if v.get("simulated"):
                e = v["simulated"]
                how = "reviewing proposals" if e.get("proposals") else "labelling from scratch"
                lines.append(f"Round {r['round']}: the simulated reviewer ({how}) spent {e['actions']} of {e['budget']} "
                             f"actions: {e['accepted']} accepted, {e['fixed']} fixed ({e.get('clicks_per_fix') or '-'} clicks "
                             f"each), {e['added']} added ({e.get('clicks_per_add') or '-'} clicks each), {e['rejected']} "
                             f"rejected, {e['dropped']} given up; {e['images_reviewed']} images done.")
        if r.get("kept_previous") and r.get("val_min_gain") is None:
            lines.append(f"Round {r['round']}: no pseudo-label to train on, so it kept its starting weights.")
        elif r.get("kept_previous"):
            lines.append(f"Round {r['round']}: no epoch beat the round's starting model on validation (best smallest "
                         f"gain {_fmt(r.get('val_min_gain'))}), so it kept its starting weights.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [-1] + [r["round"] for r in rounds] if zs else [r["round"] for r in rounds]
        for m in modes:
            ys = ([zs.get(f"{m}_miou")] if zs else []) + [r.get(f"{m}_miou") for r in rounds]
            ax.plot(xs, ys, marker="o", label=MODE_TITLES.get(m, m))
        ax.set_xlabel("round (-1: zero-shot)")
        ax.set_ylabel("test mIoU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "engine_rounds.png", dpi=100)
        plt.close(fig)
        lines += ["", "![mIoU over rounds](engine_rounds.png)"]
    except Exception as exc:  # the table is the result; a missing plot is not worth failing a run
        log.warning("could not plot the engine rounds: %s", exc)
    return lines + [""]


def _volume_section(volumes: dict) -> list[str]:
    """Per-volume 3-D Dice of the stacked slice predictions, one column per model."""
    names = [n for n in ("zero_shot", "finetuned") if volumes.get(n)]
    if not names:
        return []
    mode = MODE_TITLES.get(volumes.get("mode"), volumes.get("mode"))
    cases = sorted({c for n in names for c in volumes[n]["per_volume"]})
    lines = [f"## Volumes: 3-D Dice ({mode} prompts on every labelled slice, mean over labels)", "",
             "| volume | " + " | ".join(n.replace("_", "-") for n in names) + " |",
             "|---|" + "---:|" * len(names)]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for case in cases:
        lines.append(f"| {case} | " + " | ".join(fmt(volumes[n]["per_volume"].get(case, {}).get("dice3d")) for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{fmt(volumes[n]['dice3d'])}**" for n in names) + " |")
    return lines + [""]


def write_report(
    run_dir: Path,
    results: dict[str, EvalResult],
    *,
    skipped_files: list[dict],
    meta: dict,
    overlays: list[Path] = (),
    extra_sets: dict[str, ExtraSetResult] | None = None,
    worst: list[dict] | None = None,
    worst_mode: str = "box",
    clicks_plot: Path | None = None,
    volumes: dict | None = None,
    engine: dict | None = None,
) -> dict:
    """Write ``report.json``, ``instances.jsonl`` and ``report.md`` into ``run_dir``; return the JSON."""
    report: dict = {name: res.summary for name, res in results.items()}
    gain = gains(results)
    if gain is not None:
        report["gain"] = gain
    report["calibration"] = {name: res.calibration for name, res in results.items()}
    if extra_sets:
        report["extra_sets"] = {
            s: {"meta": ex.meta, **{n: r.summary for n, r in ex.results.items()},
                **({"gain": gains(ex.results)} if gains(ex.results) is not None else {}),
                "calibration": {n: r.calibration for n, r in ex.results.items()}, "skipped_files": ex.skipped_files}
            for s, ex in extra_sets.items()
        }
    if volumes:
        report["volumes"] = volumes
    if engine:
        report["engine"] = engine_json(engine, results.get("zero_shot"))
    if worst:
        report["worst_images"] = [{**w, "overlay": str(w["overlay"]) if w.get("overlay") else None} for w in worst]
    report["skipped_files"] = list(skipped_files)
    report["meta"] = meta
    report = _clean(report)
    atomic_write_json(run_dir / "report.json", report)
    write_instances(run_dir / "instances.jsonl", results, extra_sets)

    lines = [
        f"# samtune report: {meta.get('experiment') or 'run'}",
        "",
        f"- data: `{meta.get('data_root')}` ({meta.get('split')} split, {meta.get('n_images')} images)",
        f"- model: `{meta.get('model_type')}` from " + (f"`{meta['checkpoint']}`" if meta.get("checkpoint") else "random weights")
        + (f"; fine-tuned: `{meta['finetuned_checkpoint']}`" if meta.get("finetuned_checkpoint") else ""),
        f"- prompts: `{meta.get('prompts_file')}` (seed {meta.get('prompt_seed')}), identical for every model",
        f"- evaluation: {meta.get('eval_note', 'full image')}",
        "",
        *_summary_table(results, gain),
        "",
        "Box and three-point prompts use SAM's single-mask output; one point the multimask output with the highest "
        "predicted IoU.",
        "",
    ]
    lines += _oracle_section(results)
    lines += _clicks_section(results, clicks_plot, run_dir)
    lines += _auto_section(results)
    lines += _calibration_section(results)
    lines += _volume_section(volumes or {})
    if engine:
        lines += _engine_section(report["engine"], run_dir)
    lines += _extra_section(extra_sets or {})
    lines += _worst_section(worst or [], list(results), worst_mode, run_dir)
    if skipped_files:
        lines += [f"## Skipped files ({len(skipped_files)})", ""]
        lines += [f"- `{s['file']}`: {s['reason']}" for s in skipped_files] + [""]
    if overlays:
        lines += [f"## Overlays ({MODE_TITLES.get(worst_mode, worst_mode)} prompts)", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in overlays] + [""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return report
