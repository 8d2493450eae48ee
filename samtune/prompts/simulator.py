"""Prompt simulation for training: the configured policy applied to the instances of one image.

One training image goes through these steps (see :meth:`PromptSimulator.rounds`)::

    groups = sim.initial(gt, generator=g)            # boxes for some instances, points for the rest
    for group in groups:
        logits = decode(group)                       # N_g x 1 x h x w low-resolution logits
        for step in sim.rounds():                    # e.g. ["click", "click", "mask"]
            if step == "click":
                group = sim.correct(group, logits_to_masks(logits), gt[group.index], logits, generator=g)
            else:
                group = sim.mask_only(group, logits)
            logits = decode(group)

All instances of a group share the prompt layout (same number of points, box or not), so a group
is decoded as one batch by SAM's prompt encoder and mask decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from samtune.prompts.sampling import (
    jitter_boxes,
    masks_to_boxes,
    sample_correction_clicks,
    sample_negative_points,
    sample_points_in_masks,
)


@dataclass
class PromptGroup:
    """Prompts for a set of instances of one image that share one layout.

    Attributes:
        index: N long, which instances of the image (rows of its N_total x H x W masks) this
            group covers.
        boxes: N x 4 float XYXY boxes (inclusive max), or None.
        points: N x K x 2 float XY points, or None.
        labels: N x K long point labels (1 positive, 0 negative), or None (with ``points``).
        mask_input: N x 1 x h x w float low-resolution logits of the previous prediction, or None.
        multimask: whether the decoder should return several masks; True only for an ambiguous
            prompt, a single positive point without a box.
    """

    index: torch.Tensor
    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None
    multimask: bool = False

    def __post_init__(self) -> None:
        n = self.index.shape[0]
        if (self.points is None) != (self.labels is None):
            raise ValueError("PromptGroup: points and labels must be given together")
        checks = [
            ("boxes", self.boxes, lambda t: t.ndim == 2 and t.shape[1] == 4, "N x 4"),
            ("points", self.points, lambda t: t.ndim == 3 and t.shape[2] == 2, "N x K x 2"),
            ("labels", self.labels, lambda t: t.ndim == 2 and t.shape == self.points.shape[:2], "N x K"),
            ("mask_input", self.mask_input, lambda t: t.ndim == 4 and t.shape[1] == 1, "N x 1 x h x w"),
        ]
        for name, value, ok, shape in checks:
            if value is not None and (value.shape[0] != n or not ok(value)):
                raise ValueError(
                    f"PromptGroup.{name} must have shape {shape} with N={n}, got {tuple(value.shape)}"
                )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_points(self) -> int:
        """K, the number of points per instance (0 without points)."""
        return 0 if self.points is None else int(self.points.shape[1])

    def with_click(self, coords: torch.Tensor, labels: torch.Tensor) -> PromptGroup:
        """A new group with one more point per instance.

        Args:
            coords: N x 1 x 2 XY points.
            labels: N x 1 long labels.

        Returns:
            The group with K + 1 points; ``multimask`` is True only if the result is a single
            positive point without a box.
        """
        coords = coords.to(self.index.device, torch.float32)
        labels = labels.to(self.index.device, torch.long)
        points = coords if self.points is None else torch.cat([self.points, coords], dim=1)
        labels = labels if self.labels is None else torch.cat([self.labels, labels], dim=1)
        ambiguous = self.boxes is None and points.shape[1] == 1 and bool((labels == 1).all())
        return dataclasses.replace(self, points=points, labels=labels, multimask=ambiguous)

    def with_mask_input(self, logits: torch.Tensor) -> PromptGroup:
        """A new group with ``logits`` (N x 1 x h x w) as mask input, detached: prompts are inputs,
        so no gradient flows from one correction round into the previous one."""
        return dataclasses.replace(self, mask_input=logits.detach())

    def to(self, device: torch.device | str) -> PromptGroup:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def _check(ok: bool, field: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(f"prompts.{field} must be {requirement}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class PromptPolicy:
    """How training prompts are simulated (fields map one to one onto ``configs/prompts/*.yaml``).

    Attributes:
        box_prob: chance that an instance is prompted by a (jittered) box instead of points.
        box_noise: box jitter std as a fraction of the box side (SAM 2: 0.1).
        box_max_px: largest jitter of one box coordinate in pixels (SAM 2: 20).
        max_points: a point group uses between 1 and ``max_points`` points, drawn uniformly (SAM: 1, more
            points come from correction clicks).
        neg_point_prob: chance, per instance of a multi-point group, that some of its extra
            points (between 1 and all of them) are negative.
        correction_rounds: iterative correction clicks after the first prediction (SAM: 8).
        mask_only_rounds: extra rounds fed only the previous logits, no new click (SAM: 2).
    """

    box_prob: float = 0.5
    box_noise: float = 0.1
    box_max_px: float = 20.0
    max_points: int = 1
    neg_point_prob: float = 0.3
    correction_rounds: int = 2
    mask_only_rounds: int = 1

    def __post_init__(self) -> None:
        for name in ("box_prob", "neg_point_prob"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 <= value <= 1, name, "in [0, 1]", value)
        for name in ("box_noise", "box_max_px"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, ">= 0", value)
        _check(
            _is_int(self.max_points) and self.max_points >= 1,
            "max_points",
            "an integer >= 1",
            self.max_points,
        )
        for name in ("correction_rounds", "mask_only_rounds"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, "an integer >= 0", value)


class PromptSimulator:
    """Applies a :class:`PromptPolicy` to ground-truth masks, batched over instances.

    Args:
        policy: the prompt policy.
    """

    def __init__(self, policy: PromptPolicy) -> None:
        self.policy = policy

    def rounds(self) -> list[str]:
        """The schedule after the first prediction: ``"click"`` rounds, then ``"mask"`` rounds."""
        return ["click"] * self.policy.correction_rounds + ["mask"] * self.policy.mask_only_rounds

    def initial(self, gt: torch.Tensor, *, generator: torch.Generator) -> list[PromptGroup]:
        """First prompts: each instance gets a jittered box or a set of points.

        Each instance independently joins the box group with probability ``box_prob``. The
        point group draws one number of points ``k`` in ``[1, max_points]`` for all its
        instances; the first point is a uniform pixel of the mask, and with probability
        ``neg_point_prob`` an instance's last ``m`` points (``m`` uniform in ``[1, k - 1]``)
        are negative, the others positive and distinct from the first where the mask allows.

        Args:
            gt: N x H x W bool ground-truth masks.
            generator: CPU random generator.

        Returns:
            Up to two groups (box group first); empty groups are left out, every instance is in
            exactly one group.
        """
        n, h, w = gt.shape
        p = self.policy
        use_box = (torch.rand(n, generator=generator) < p.box_prob).to(gt.device)
        k = int(torch.randint(1, p.max_points + 1, (1,), generator=generator))
        all_idx = torch.arange(n, device=gt.device)
        groups = []
        box_idx, pt_idx = all_idx[use_box], all_idx[~use_box]
        if box_idx.numel() > 0:
            boxes = jitter_boxes(
                masks_to_boxes(gt[box_idx]),
                noise=p.box_noise,
                max_px=p.box_max_px,
                image_size=(h, w),
                generator=generator,
            )
            groups.append(PromptGroup(index=box_idx, boxes=boxes))
        if pt_idx.numel() > 0:
            masks = gt[pt_idx]
            m = pt_idx.numel()
            points = sample_points_in_masks(masks, k, generator=generator)
            labels = torch.ones(m, k, dtype=torch.long)
            if k > 1:
                negatives = sample_negative_points(masks, k - 1, generator=generator)
                has_neg = torch.rand(m, generator=generator) < p.neg_point_prob
                num_neg = torch.randint(1, k, (m,), generator=generator) * has_neg
                slot = torch.arange(k)
                labels = (slot[None, :] < k - num_neg[:, None]).long()
                is_neg = (labels == 0).to(gt.device)[:, 1:, None]
                points[:, 1:] = torch.where(is_neg, negatives, points[:, 1:])
            labels = labels.to(gt.device)
            groups.append(PromptGroup(index=pt_idx, points=points, labels=labels, multimask=k == 1))
        return groups

    def correct(
        self,
        group: PromptGroup,
        pred: torch.Tensor,
        gt: torch.Tensor,
        logits: torch.Tensor,
        *,
        generator: torch.Generator,
    ) -> PromptGroup:
        """Add one correction click (from the prediction's error region) and the previous logits.

        Args:
            group: the group that produced ``pred``.
            pred: N_g x H x W bool predicted masks.
            gt: N_g x H x W bool ground truth of the group's instances (``gt_all[group.index]``).
            logits: N_g x 1 x h x w low-resolution logits of the prediction.
            generator: CPU random generator.

        Returns:
            The group with K + 1 points and ``mask_input = logits``.
        """
        if pred.shape[0] != len(group) or gt.shape[0] != len(group):
            raise ValueError(
                f"correct: group has {len(group)} instances, pred {pred.shape[0]} and gt {gt.shape[0]}"
            )
        coords, labels = sample_correction_clicks(pred, gt, generator=generator)
        return group.with_click(coords, labels).with_mask_input(logits)

    def mask_only(self, group: PromptGroup, logits: torch.Tensor) -> PromptGroup:
        """Same prompts, with ``logits`` (N_g x 1 x h x w) as the new mask input."""
        return group.with_mask_input(logits)
