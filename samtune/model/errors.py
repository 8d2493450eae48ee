"""The error every checkpoint reader raises."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the chosen model."""
