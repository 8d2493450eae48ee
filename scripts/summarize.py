"""Tabulate a sweep: ``python scripts/summarize.py outputs/pcb/multiruns/<timestamp>``.

Ranks the runs of a Hydra multirun (grid or Optuna) by the validation metric and writes ``summary.md``,
``summary.csv`` and ``summary.png`` into the sweep directory (or ``--out``), with each run's overrides and test
figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtune.evaluation.sweep_summary import write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    parser.add_argument("--metric", default="val/miou", help="ranking metric, a key of each run's metrics.json")
    parser.add_argument("--minimize", action="store_true", help="lower is better")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep directory)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: not a directory")
    try:
        paths = write_summary(args.sweep_dir, metric=args.metric, maximize=not args.minimize, out_dir=args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
