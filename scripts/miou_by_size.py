"""mIoU by object size: ``python scripts/miou_by_size.py RUN_DIR [RUN_DIR ...] [--modes point1 point3]``.

Reads each evaluation run's ``instances.jsonl`` (one IoU per prompt and instance) and ``report.json`` (the dataset
root and split), measures every instance's mask as a fraction of its image's area, and prints the mIoU (and the
number of instances) of each mode and model in each size bin as a Markdown table: by default under 1 %, 1-5 %,
5-25 % and over 25 % of the image. Runs on the same data and prompts compare bin by bin, e.g. whole image
(``eval.zoom=null``) against zoom with and without ``eval.zoom_whole_first``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from samtune.data.records import load_record
from samtune.data.sources import build_records


def area_fractions(run_dir: Path) -> dict[tuple[str, int], float]:
    """(image rel_path, instance id) -> the instance's area / the image's area, for the main set of a run."""
    meta = json.loads((run_dir / "report.json").read_text())["meta"]
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    binary = bool(cfg.data.get("binary_as_one_object", False))
    source = "folder" if cfg.data.source == "volume" else str(cfg.data.source)
    records, _ = build_records(source, Path(meta["data_root"]), str(meta["split"]), skip_invalid=True,
                               binary_as_one_object=binary)
    out = {}
    for record in records:
        _, instances = load_record(record, binary_as_one_object=binary)
        areas = np.bincount(instances.ravel())
        for k in np.flatnonzero(areas)[1:] if areas.size > 1 else []:
            out[(record.rel_path, int(k))] = float(areas[k]) / instances.size
    return out


def size_bins(edges: list[float]) -> list[str]:
    """Labels of the bins that ``edges`` (fractions, increasing) cut: ``<1%``, ``1-5%``, ..., ``>25%``."""
    pct = [f"{100 * e:g}" for e in edges]
    return [f"<{pct[0]}%", *(f"{a}-{b}%" for a, b in zip(pct, pct[1:])), f">{pct[-1]}%"]


def miou_by_size(run_dir: Path, modes: list[str], edges: list[float]) -> dict[tuple[str, str], list]:
    """(model, mode) -> per bin ``(mIoU, n)`` plus the overall ``(mIoU, n)`` last."""
    fractions = area_fractions(run_dir)
    ious: dict[tuple[str, str], list[list[float]]] = defaultdict(lambda: [[] for _ in range(len(edges) + 2)])
    with (run_dir / "instances.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if row["mode"] not in modes:
                continue
            frac = fractions[(row["image"], int(row["instance"]))]
            per_bin = ious[(row["model"], row["mode"])]
            per_bin[int(np.searchsorted(edges, frac, side="right"))].append(float(row["iou"]))
            per_bin[-1].append(float(row["iou"]))
    return {key: [(float(np.mean(v)) if v else float("nan"), len(v)) for v in bins] for key, bins in ious.items()}


def table(runs: list[tuple[str, Path]], modes: list[str], edges: list[float]) -> str:
    """The Markdown table of :func:`miou_by_size` for the labelled runs."""
    head = ["run", "model", "mode", *size_bins(edges), "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, run_dir in runs:
        result = miou_by_size(run_dir, modes, edges)
        for (model, mode), cells in sorted(result.items(), key=lambda kv: (kv[0][0], modes.index(kv[0][1]))):
            values = [f"{m:.3f} ({n})" if n else "- (0)" for m, n in cells]
            lines.append("| " + " | ".join([label, model, mode, *values]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="evaluation run folders (with instances.jsonl and report.json); "
                        "LABEL=DIR names a run in the table")
    parser.add_argument("--modes", nargs="+", default=["point1", "point3"], help="prompt modes to tabulate")
    parser.add_argument("--edges", nargs="+", type=float, default=[0.01, 0.05, 0.25],
                        help="bin edges as fractions of the image area (increasing)")
    args = parser.parse_args(argv)
    if sorted(args.edges) != args.edges or any(not 0 < e < 1 for e in args.edges):
        parser.error("--edges must be increasing fractions in (0, 1)")
    runs = []
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        run_dir = Path(path)
        if not (run_dir / "instances.jsonl").is_file() or not (run_dir / "report.json").is_file():
            parser.error(f"{run_dir}: no instances.jsonl and report.json (an evaluation run folder?)")
        runs.append((label or run_dir.name, run_dir))
    print(table(runs, args.modes, args.edges))
    return 0


if __name__ == "__main__":
    sys.exit(main())
