"""Which training images are labelled (``data.labeled_fraction`` / ``data.labeled_ids``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from samtune.data.records import ImageRecord


def split_labeled(records: Sequence[ImageRecord], *, fraction: float | None = None, ids: Sequence[str] | None = None,
                  seed: int = 0) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split training records into (labelled, unlabelled).

    Args:
        records: The training split.
        fraction: Keep this fraction of the images labelled (at least one), drawn with ``seed``; None: all.
        ids: Explicit labelled images, by id (file name without extension) or ``rel_path``; overrides ``fraction``.
        seed: Seed of the draw (the same seed always gives the same split).

    Raises:
        ValueError: A fraction outside (0, 1], or ids that match no image.
    """
    records = sorted(records, key=lambda r: r.rel_path)
    if ids is not None:
        wanted = {str(i) for i in ids}
        labeled = [r for r in records if r.image_id in wanted or r.rel_path in wanted]
        found = {r.image_id for r in labeled} | {r.rel_path for r in labeled}
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"data.labeled_ids: no training image with the id(s) {missing[:10]}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    elif fraction is None:
        return list(records), []
    else:
        fraction = float(fraction)
        if not 0 < fraction <= 1:
            raise ValueError(f"data.labeled_fraction must be in (0, 1], got {fraction}")
        n = max(1, int(round(fraction * len(records))))
        chosen = set(np.random.default_rng(seed).permutation(len(records))[:n].tolist())
        labeled = [r for i, r in enumerate(records) if i in chosen]
    keep = {r.rel_path for r in labeled}
    return labeled, [r for r in records if r.rel_path not in keep]
