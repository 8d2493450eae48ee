"""Find the run that ``resume=true`` continues.

Hydra gives each run a fresh, time-stamped directory, so "the same command again" lands in a new one.
``resume=true`` looks among the sibling run directories for the newest one that was started with the
same overrides (ignoring ``resume`` itself) and holds ``checkpoints/last.ckpt``; ``resume=DIR``
names the run directory explicitly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"


def run_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return None
    return sorted(o for o in items if not str(o).lstrip("+~").startswith(("resume=", "hydra.")))


def find_resumable_run(resume: bool | str, current_dir: Path) -> tuple[Path, Path] | None:
    """Return (run directory, checkpoint) to continue, or None to start afresh.

    Args:
        resume: ``True`` to look for the latest matching sibling run, or a run directory path.
        current_dir: The run directory Hydra created for this invocation.

    Raises:
        FileNotFoundError: ``resume`` names a directory without ``checkpoints/last.ckpt``.
    """
    if not isinstance(resume, bool):
        run = Path(str(resume)).expanduser().resolve()
        if not (run / LAST).is_file():
            raise FileNotFoundError(f"resume={resume}: no {LAST} in that directory, nothing to resume")
        return run, run / LAST
    if (current_dir / LAST).is_file():  # hydra.run.dir=D given explicitly: D itself
        return current_dir, current_dir / LAST
    wanted = run_overrides(current_dir)
    candidates = sorted((p for p in current_dir.parent.iterdir() if p.is_dir() and p != current_dir), reverse=True)
    for run in candidates:
        if (run / LAST).is_file() and run_overrides(run) == wanted:
            return run, run / LAST
    log.warning("resume=true: no earlier run of this command with %s under %s; starting a new run.", LAST, current_dir.parent)
    return None
