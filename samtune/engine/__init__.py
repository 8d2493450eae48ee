"""The data engine: supervised, semi-supervised and pseudo-label rounds on the user's own data."""

from samtune.engine.runner import plan, run_engine
from samtune.engine.split import split_labeled

__all__ = ["plan", "run_engine", "split_labeled"]
