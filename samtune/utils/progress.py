"""Progress bars for long work (quiet when stderr is not a terminal, e.g. in CI logs)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar (printed every few seconds when not on a terminal)."""
    interactive = sys.stderr.isatty()
    yield from tqdm(items, desc=desc, total=total, mininterval=0.5 if interactive else 10.0, leave=False)
