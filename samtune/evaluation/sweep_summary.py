"""Tabulate the runs of a Hydra multirun (grid sweep or Optuna search): ``scripts/summarize.py``.

Each run directory of the sweep holds ``.hydra/overrides.yaml`` (its overrides), ``metrics.json`` (what
``train()`` returned: the validation metric and the test figures) and ``report.json``. The summary ranks the
runs by the validation metric and writes ``summary.md``, ``summary.csv`` and ``summary.png``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samtune.predict.modes import EVAL_MODES as MODES
from samtune.utils.io import atomic_write_text, read_json


@dataclass
class SweepRun:
    """One run of a sweep.

    Attributes:
        path: Its directory, relative to the sweep directory.
        overrides: Its command-line overrides (``key=value``).
        metrics: ``metrics.json`` (empty if the run did not finish).
        value: The ranking metric (nan if missing).
    """

    path: str
    overrides: list[str]
    metrics: dict = field(default_factory=dict)
    value: float = float("nan")

    @property
    def finished(self) -> bool:
        return bool(self.metrics)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def collect_runs(sweep_dir: Path, metric: str = "val/miou") -> list[SweepRun]:
    """Every run under ``sweep_dir`` (any depth), with its overrides and metrics.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no Hydra run.
    """
    runs = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = ov.parent.parent
        overrides = [str(o) for o in (yaml.safe_load(ov.read_text()) or [])]
        metrics_path = run_dir / "metrics.json"
        metrics = read_json(metrics_path) if metrics_path.is_file() else {}
        runs.append(SweepRun(run_dir.relative_to(sweep_dir).as_posix() or ".", overrides, metrics,
                             _num(metrics.get(metric))))
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no Hydra runs (no */.hydra/overrides.yaml) under this folder")
    return runs


def rank(runs: list[SweepRun], maximize: bool = True) -> list[SweepRun]:
    """Runs sorted by value, best first; runs without a value last."""
    sign = -1 if maximize else 1
    return sorted(runs, key=lambda r: (math.isnan(r.value), sign * r.value if not math.isnan(r.value) else 0, r.path))


def split_overrides(runs: list[SweepRun]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides common to all runs, run path -> its own overrides)."""
    common = set(runs[0].overrides)
    for r in runs[1:]:
        common &= set(r.overrides)
    ordered_common = [o for o in runs[0].overrides if o in common]
    return ordered_common, {r.path: [o for o in r.overrides if o not in common] for r in runs}


def _columns(runs: list[SweepRun]) -> list[tuple[str, str]]:
    """(header, metrics key) of the test figures present in any run."""
    keys = set().union(*(r.metrics for r in runs))
    cols = []
    for mode in MODES:
        for model, short in (("finetuned", "ft"), ("zero_shot", "zs")):
            key = f"test/{model}/{mode}_miou"
            if key in keys and (model == "finetuned" or mode == "box"):
                cols.append((f"test {short} {mode} mIoU", key))
    for key, header in (("test/finetuned/clicks_noc90", "test ft NoC@90"),
                        ("test/finetuned/auto_recall50", "test ft auto recall@0.5")):
        if key in keys:
            cols.append((header, key))
    return cols


def _fmt(v) -> str:
    v = _num(v) if not isinstance(v, str) else v
    return v if isinstance(v, str) else ("n/a" if math.isnan(v) else f"{v:.4f}")


def summary_rows(runs: list[SweepRun], metric: str) -> tuple[list[str], list[list], list[str]]:
    """(header, rows, common overrides) of the ranked runs."""
    common, own = split_overrides(runs)
    cols = _columns(runs)
    header = ["rank", "run", "status", metric, "overrides", *[h for h, _ in cols]]
    rows = []
    for i, r in enumerate(runs, 1):
        rows.append([i, r.path, "done" if r.finished else "incomplete", r.value, " ".join(own[r.path]),
                     *[_num(r.metrics.get(k)) for _, k in cols]])
    return header, rows, common


def plot_summary(path: Path, runs: list[SweepRun], own: dict[str, list[str]], metric: str) -> Path:
    """Horizontal bars of the metric per run (best on top), with the fine-tuned test box mIoU as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(" ".join(own[r.path]) or r.path)[:60] for r in runs]
    values = [0.0 if math.isnan(r.value) else r.value for r in runs]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(runs) + 1.5))
    y = list(range(len(runs)))[::-1]
    ax.barh(y, values, color="tab:blue", alpha=0.7, label=metric)
    test = [_num(r.metrics.get("test/finetuned/box_miou")) for r in runs]
    if any(not math.isnan(t) for t in test):
        ax.scatter(test, y, color="tab:orange", zorder=3, label="test fine-tuned box mIoU")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("mIoU")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_summary(sweep_dir: Path, *, metric: str = "val/miou", maximize: bool = True,
                  out_dir: Path | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv`` and ``summary.png`` for the sweep; return their paths."""
    out_dir = out_dir or sweep_dir
    runs = rank(collect_runs(sweep_dir, metric), maximize)
    header, rows, common = summary_rows(runs, metric)
    _, own = split_overrides(runs)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*header, "all_overrides"])
    for row, r in zip(rows, runs):
        writer.writerow([*("" if isinstance(v, float) and math.isnan(v) else v for v in row), " ".join(r.overrides)])
    paths = {"csv": atomic_write_text(out_dir / "summary.csv", buf.getvalue())}

    lines = [f"# Sweep summary: `{sweep_dir}`", "",
             f"{len(runs)} runs ({sum(r.finished for r in runs)} finished), ranked by `{metric}` "
             f"({'higher' if maximize else 'lower'} is better).", ""]
    if common:
        lines += ["Common overrides: " + " ".join(f"`{o}`" for o in common), ""]
    best = sweep_dir / "optimization_results.yaml"
    if best.is_file():
        lines += ["Optuna's best parameters (`optimization_results.yaml`):", "", "```yaml", best.read_text().strip(),
                  "```", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"`{v}`" if j == 4 and v else _fmt(v) if isinstance(v, float) else str(v)
                                       for j, v in enumerate(row)) + " |")
    paths["png"] = plot_summary(out_dir / "summary.png", runs, own, metric)
    lines += ["", f"![{metric} per run](summary.png)", ""]
    paths["md"] = atomic_write_text(out_dir / "summary.md", "\n".join(lines))
    return paths
