"""The prompt modes: one registry of what each mode reads, how it decodes and how it is named.

A mode is named in ``eval.modes`` (evaluation) or ``mode=`` (``scripts/predict.py``). Each has a *kind* that says
how it is run and summarised:

- ``fixed``: one fixed prompt per object (``prompts.json`` for evaluation, a prompt file for prediction), decoded
  once (``box``, ``point1``, ``point3``; ``points`` for prediction, any number of points);
- ``oracle``: the one-point prompts decoded once per multimask output, each object scored by its best output;
- ``clicks``: iterative corrective clicks from the one-point prompt (:mod:`samtune.evaluation.clicks`);
- ``auto``: automatic mask generation, no prompt (:mod:`samtune.predict.auto`).

Adding a fixed-prompt mode is one entry here (and its prompts in :mod:`samtune.prompts.eval_prompts`);
evaluation, its report, sweep summaries, zoomed validation and prediction read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptMode:
    """One prompt mode.

    Attributes:
        name: Its name in ``eval.modes`` / ``mode=`` and in every report.
        title: How reports and overlays title it.
        kind: ``fixed``, ``oracle``, ``clicks`` or ``auto`` (see the module docstring).
        key: The field of each object's prompt dict it reads (``box``, ``point1``, ...; None for ``auto``).
        multimask: Decode with the best of SAM's three multimask outputs (SAM's choice for one ambiguous point)
            instead of the single-mask output; None: by the number of points (one point: multimask).
        zoom: Whether it runs under prompt-focused zoom (``eval.zoom``).
        evaluated: Whether ``eval.modes`` may name it.
        predicted: Whether ``scripts/predict.py mode=`` may name it.
    """

    name: str
    title: str
    kind: str
    key: str | None
    multimask: bool | None
    zoom: bool = True
    evaluated: bool = True
    predicted: bool = False

    def multimask_for(self, n_points: int) -> bool:
        """The output choice of a prompt of ``n_points`` points (0 for a box)."""
        return n_points == 1 if self.multimask is None else self.multimask

    @property
    def is_box(self) -> bool:
        return self.key == "box"


REGISTRY: dict[str, PromptMode] = {m.name: m for m in (
    PromptMode("box", "box", "fixed", "box", multimask=False, predicted=True),
    PromptMode("point1", "1 point", "fixed", "point1", multimask=True),
    PromptMode("point3", "3 points", "fixed", "point3", multimask=False),
    PromptMode("point1_oracle", "1 point, best of 3 outputs (oracle)", "oracle", "point1", multimask=True),
    PromptMode("clicks", "clicks", "clicks", "point1", multimask=None),
    PromptMode("auto", "auto", "auto", None, multimask=None, predicted=True),
    PromptMode("points", "points", "fixed", "points", multimask=None, evaluated=False, predicted=True),
)}

# the modes evaluation may run, in report order
EVAL_MODES: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.evaluated)
# the modes with one fixed prompt per object in prompts.json (evaluation's default; zoomed validation's)
FIXED_MODES: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.evaluated and m.kind == "fixed")
# the modes of scripts/predict.py
PREDICT_MODES: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.predicted)
# name -> report title
TITLES: dict[str, str] = {n: m.title for n, m in REGISTRY.items()}


def prompt_mode(name: str) -> PromptMode:
    """The registered mode ``name``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown prompt mode {name!r}; valid: {list(REGISTRY)}")
    return REGISTRY[name]
