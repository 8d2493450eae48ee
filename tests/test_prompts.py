"""Property tests of samtune.prompts on synthetic blobs (ellipses, rectangles, rings, single
pixels, masks touching the border), checked against independent numpy / scipy references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from samtune.prompts import (
    PromptGroup,
    PromptPolicy,
    PromptSimulator,
    center_points,
    jitter_boxes,
    largest_error_click,
    load_prompts,
    make_instance_prompts,
    masks_to_boxes,
    sample_correction_clicks,
    sample_negative_points,
    sample_points_in_masks,
    save_prompts,
)

H, W = 32, 40


def blob(rng: np.random.Generator, h: int = H, w: int = W, kind: str | None = None) -> np.ndarray:
    """One random non-empty H x W bool blob."""
    kind = kind or rng.choice(["ellipse", "rect", "ring", "pixel", "border"])
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    if kind == "pixel":
        m = np.zeros((h, w), bool)
        m[rng.integers(h), rng.integers(w)] = True
        return m
    if kind == "border":  # a rectangle glued to a random image edge
        m = np.zeros((h, w), bool)
        d = int(rng.integers(1, max(1, min(h, w) // 2) + 1))
        edge = rng.integers(4)
        sl = [np.s_[:d, :], np.s_[-d:, :], np.s_[:, :d], np.s_[:, -d:]][edge]
        m[sl] = True
        return m
    if kind == "rect":
        y0, x0 = rng.integers(h), rng.integers(w)
        m = np.zeros((h, w), bool)
        m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        return m
    ry, rx = rng.uniform(1, max(1.0, h / 2)), rng.uniform(1, max(1.0, w / 2))
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    m = (r <= 1) & (r >= 0.4) if kind == "ring" else r <= 1
    if not m.any():
        m[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    return m


def blobs(seed: int, n: int = 12, h: int = H, w: int = W) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([blob(rng, h, w) for _ in range(n)]))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def at(masks: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """masks[i, y, x] for pts N x K x 2 -> N x K bool."""
    xy = pts.long()
    n = torch.arange(masks.shape[0])[:, None]
    return masks[n, xy[..., 1], xy[..., 0]]


def padded_edt(region: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


EMPTY = torch.zeros(0, H, W, dtype=torch.bool)


@pytest.mark.parametrize("seed", range(3))
def test_masks_to_boxes_is_tight_extent(seed):
    masks = blobs(seed)
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32 and boxes.shape == (len(masks), 4)
    for m, b in zip(masks.numpy(), boxes.tolist(), strict=True):
        ys, xs = np.nonzero(m)
        assert b == [xs.min(), ys.min(), xs.max(), ys.max()]


@settings(max_examples=15, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), h=st.integers(1, 24), w=st.integers(1, 24))
def test_sampled_points_lie_in_their_masks(seed, k, h, w):
    masks = blobs(seed, n=6, h=h, w=w)
    pts = sample_points_in_masks(masks, k, generator=gen(seed))
    assert pts.shape == (6, k, 2) and pts.dtype == torch.float32
    assert at(masks, pts).all()
    for m, p in zip(masks, pts, strict=True):  # distinct whenever the mask has enough pixels
        if m.sum() >= k:
            assert len({tuple(q) for q in p.tolist()}) == k


def test_points_are_uniform_and_one_pixel_masks_repeat():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    pts = sample_points_in_masks(mask.expand(4000, 5, 5), 1, generator=gen())
    _, counts = torch.unique(pts[:, 0], dim=0, return_counts=True)
    assert len(counts) == 4 and counts.min() > 850  # 1000 expected per pixel
    one = torch.zeros(1, 5, 5, dtype=torch.bool)
    one[0, 4, 2] = True
    assert sample_points_in_masks(one, 3, generator=gen()).tolist() == [[[2.0, 4.0]] * 3]


@pytest.mark.parametrize("seed", range(3))
def test_jittered_boxes_stay_in_image_and_near_tight_box(seed):
    masks = blobs(seed, n=50)
    tight = masks_to_boxes(masks)
    boxes = jitter_boxes(tight, noise=0.5, max_px=3.0, image_size=(H, W), generator=gen(seed))
    assert boxes.shape == (50, 4)
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= W - 1).all() and (boxes[:, [1, 3]] <= H - 1).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert ((boxes - tight).abs() <= 3.0 + 1e-5).all()
    assert not torch.equal(boxes, tight)
    same = jitter_boxes(tight, noise=0.5, max_px=3.0, image_size=(H, W), generator=gen(seed))
    assert torch.equal(boxes, same)
    assert torch.equal(jitter_boxes(tight, noise=0.0, image_size=(H, W), generator=gen()), tight)


@pytest.mark.parametrize("seed", range(3))
def test_negative_points_lie_outside_near_the_mask(seed):
    masks = blobs(seed, n=20)
    pts = sample_negative_points(masks, 4, generator=gen(seed), margin=0.25)
    assert pts.shape == (20, 4, 2)
    assert not at(masks, pts).any()
    boxes = masks_to_boxes(masks)
    side = boxes[:, 2:] - boxes[:, :2] + 1
    lo, hi = boxes[:, :2] - 0.25 * side, boxes[:, 2:] + 0.25 * side
    for i in range(20):
        ys, xs = np.mgrid[:H, :W]
        near = (
            (xs >= lo[i, 0].item())
            & (xs <= hi[i, 0].item())
            & (ys >= lo[i, 1].item())
            & (ys <= hi[i, 1].item())
        )
        if (near & ~masks[i].numpy()).any():  # candidates near the instance exist: used
            assert all(near[int(y), int(x)] for x, y in pts[i].tolist())


def test_negative_points_fallbacks():
    masks = torch.zeros(3, 6, 7, dtype=torch.bool)
    masks[0] = True  # no background at all -> corner
    masks[1, :, 1:] = True  # background only in column 0 (inside the enlarged box here)
    pts = sample_negative_points(masks, 2, generator=gen())
    assert pts[0].tolist() == [[0.0, 0.0]] * 2
    assert (pts[1, :, 0] == 0).all()
    assert ((pts[2] >= 0) & (pts[2] <= torch.tensor([6.0, 5.0]))).all()  # empty mask: anywhere


@pytest.mark.parametrize("seed", range(3))
def test_center_point_is_farthest_from_boundary(seed):
    masks = blobs(seed, n=20)
    pts = center_points(masks)
    assert pts.shape == (20, 1, 2)
    assert at(masks, pts).all()
    for m, p in zip(masks.numpy(), pts[:, 0].tolist(), strict=True):
        dist = padded_edt(m)
        x, y = int(p[0]), int(p[1])
        assert dist[y, x] == pytest.approx(dist.max(), abs=1e-4)
        assert (y * W + x) == int(np.argmax(dist))  # ties: lowest row-major index


def test_center_point_tie_survives_last_bit_noise(monkeypatch):
    """OpenCV's exact transform rounds the last bit of a distance differently from call to call; a tie must
    still go to the lowest row-major pixel, or the same mask gets another prompt in another run."""
    import cv2

    region = np.zeros((40, 60), dtype=bool)
    region[5:18, 4:17] = True  # two equal squares: their centres tie
    region[20:33, 40:53] = True
    real = cv2.distanceTransform

    def noisy(src, *args):
        dist = real(src, *args)
        ys, xs = np.nonzero(dist == dist.max())
        y, x = ys[-1], xs[-1]  # the later tie comes out one float32 step larger
        dist[y, x] = np.nextafter(dist[y, x], np.float32(np.inf))
        return dist

    monkeypatch.setattr(cv2, "distanceTransform", noisy)
    assert center_points(torch.from_numpy(region)[None]).tolist() == [[[10.0, 11.0]]]


def test_center_point_of_a_large_region_is_exact():
    # past the distance where float32 squares stay exact, SciPy's transform decides; ties still go first
    region = np.ones((1100, 1104), dtype=bool)
    (x, y), = center_points(torch.from_numpy(region)[None])[:, 0].tolist()
    dist = padded_edt(region)
    assert dist[int(y), int(x)] == dist.max() and int(y) * 1104 + int(x) == int(np.argmax(dist))


def test_center_point_of_empty_mask_is_image_centre():
    assert center_points(torch.zeros(1, 9, 14, dtype=torch.bool)).tolist() == [[[7.0, 4.0]]]


@pytest.mark.parametrize("seed", range(3))
def test_correction_click_lies_in_error_with_matching_label(seed):
    gt = blobs(seed, n=30)
    pred = blobs(seed + 100, n=30)
    pred[:5] = gt[:5]  # perfect predictions
    coords, labels = sample_correction_clicks(pred, gt, generator=gen(seed))
    assert coords.shape == (30, 1, 2) and labels.shape == (30, 1) and labels.dtype == torch.long
    in_gt, in_pred = at(gt, coords), at(pred, coords)
    assert (in_gt[5:] != in_pred[5:]).all()  # disagreement
    assert torch.equal(labels.bool(), in_gt)  # 1 for FN, 0 for FP
    assert in_gt[:5].all() and (labels[:5] == 1).all()  # perfect: positive inside gt


def test_correction_click_region_chosen_by_size():
    gt = torch.zeros(3000, 4, 4, dtype=torch.bool)
    gt[:, 0, :3] = True  # 3 FN pixels
    pred = torch.zeros_like(gt)
    pred[:, 3, 3] = True  # 1 FP pixel
    _, labels = sample_correction_clicks(pred, gt, generator=gen())
    assert 0.72 < labels.float().mean().item() < 0.78  # 3 / 4 expected


def test_correction_click_on_empty_masks():
    e = torch.zeros(1, 5, 6, dtype=torch.bool)
    coords, labels = sample_correction_clicks(e, e, generator=gen())
    assert coords.tolist() == [[[3.0, 2.0]]] and labels.tolist() == [[0]]


@pytest.mark.parametrize("seed", range(3))
def test_largest_error_click_in_largest_error_region(seed):
    gt = blobs(seed, n=20)
    pred = blobs(seed + 50, n=20)
    pred[:3] = gt[:3]
    coords, labels = largest_error_click(pred, gt)
    assert torch.equal(coords, largest_error_click(pred, gt)[0])  # deterministic
    eight = np.ones((3, 3), bool)
    for i in range(20):
        g, p = gt[i].numpy(), pred[i].numpy()
        x, y = (int(v) for v in coords[i, 0].tolist())
        if i < 3:
            assert g[y, x] and labels[i, 0] == 1
            continue
        sizes, comps = [], {}
        for lab, err in ((1, g & ~p), (0, p & ~g)):
            cc, num = ndimage.label(err, structure=eight)
            comps[lab] = cc
            sizes += list(np.bincount(cc.ravel())[1:])
        lab = int(labels[i, 0])
        comp_id = comps[lab][y, x]
        assert comp_id > 0  # inside an error region of the labelled kind
        region = comps[lab] == comp_id
        assert region.sum() == max(sizes)
        dist = padded_edt(region)
        assert dist[y, x] == pytest.approx(dist.max(), abs=1e-4)


def test_empty_batches_keep_shapes():
    g = gen()
    assert masks_to_boxes(EMPTY).shape == (0, 4)
    assert jitter_boxes(torch.zeros(0, 4), image_size=(H, W), generator=g).shape == (0, 4)
    assert sample_points_in_masks(EMPTY, 3, generator=g).shape == (0, 3, 2)
    assert sample_negative_points(EMPTY, 2, generator=g).shape == (0, 2, 2)
    assert center_points(EMPTY).shape == (0, 1, 2)
    c, lab = sample_correction_clicks(EMPTY, EMPTY, generator=g)
    assert c.shape == (0, 1, 2) and lab.shape == (0, 1)
    c, lab = largest_error_click(EMPTY, EMPTY)
    assert c.shape == (0, 1, 2) and lab.shape == (0, 1)
    assert PromptSimulator(PromptPolicy()).initial(EMPTY, generator=g) == []


# --- simulator ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_initial_groups_cover_each_instance_once(seed):
    gt = blobs(seed, n=15)
    policy = PromptPolicy(max_points=4, neg_point_prob=0.5)
    groups = PromptSimulator(policy).initial(gt, generator=gen(seed))
    covered = torch.cat([g.index for g in groups]).sort().values
    assert torch.equal(covered, torch.arange(15))
    for g in groups:
        masks = gt[g.index]
        if g.boxes is not None:
            assert g.points is None and not g.multimask
            assert ((g.boxes - masks_to_boxes(masks)).abs() <= policy.box_max_px + 1e-5).all()
        else:
            assert g.multimask == (g.num_points == 1)
            assert (g.labels[:, 0] == 1).all()
            assert torch.equal(at(masks, g.points), g.labels.bool())  # positives in, negatives out


def test_initial_respects_box_prob_and_is_deterministic():
    gt = blobs(1, n=10)
    only_boxes = PromptSimulator(PromptPolicy(box_prob=1.0)).initial(gt, generator=gen())
    assert len(only_boxes) == 1 and only_boxes[0].boxes is not None
    only_points = PromptSimulator(PromptPolicy(box_prob=0.0)).initial(gt, generator=gen())
    assert len(only_points) == 1 and only_points[0].points is not None
    sim = PromptSimulator(PromptPolicy())
    a, b = sim.initial(gt, generator=gen(7)), sim.initial(gt, generator=gen(7))
    for ga, gb in zip(a, b, strict=True):
        for f in ("index", "boxes", "points", "labels"):
            va, vb = getattr(ga, f), getattr(gb, f)
            assert (va is None and vb is None) or torch.equal(va, vb)


def test_correction_rounds_append_clicks_and_mask_input():
    gt = blobs(2, n=6)
    sim = PromptSimulator(PromptPolicy(correction_rounds=2, mask_only_rounds=1))
    assert sim.rounds() == ["click", "click", "mask"]
    for group in sim.initial(gt, generator=gen(3)):
        n = len(group)
        logits = torch.randn(n, 1, 8, 8, requires_grad=True)
        k = group.num_points
        pred = blobs(9, n=n)
        new = sim.correct(group, pred, gt[group.index], logits, generator=gen())
        assert new.num_points == k + 1 and new.labels.shape == (n, k + 1)
        assert not new.multimask and new.mask_input.shape == (n, 1, 8, 8)
        assert not new.mask_input.requires_grad
        assert torch.equal(at(gt[group.index], new.points[:, -1:]), new.labels[:, -1:].bool())
        again = sim.mask_only(new, logits * 2)
        assert torch.equal(again.points, new.points) and torch.equal(again.mask_input, logits.detach() * 2)


def test_prompt_group_click_and_device():
    group = PromptGroup(
        index=torch.tensor([0, 2]),
        points=torch.zeros(2, 1, 2),
        labels=torch.ones(2, 1, dtype=torch.long),
        multimask=True,
    )
    assert group.with_click(torch.ones(2, 1, 2), torch.zeros(2, 1)).num_points == 2
    boxed = PromptGroup(index=torch.tensor([1]), boxes=torch.zeros(1, 4)).with_click(
        torch.ones(1, 1, 2), torch.ones(1, 1)
    )
    assert boxed.num_points == 1 and not boxed.multimask
    assert PromptGroup(index=torch.tensor([1])).with_click(torch.ones(1, 1, 2), torch.ones(1, 1)).multimask
    moved = group.to("cpu")
    assert moved.points.device.type == "cpu" and moved.multimask
    with pytest.raises(ValueError, match="PromptGroup.boxes"):
        PromptGroup(index=torch.tensor([0, 1]), boxes=torch.zeros(3, 4))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("box_prob", 1.5),
        ("neg_point_prob", -0.1),
        ("box_noise", -1.0),
        ("max_points", 0),
        ("correction_rounds", -1),
    ],
)
def test_policy_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"prompts.{field} must be"):
        PromptPolicy(**{field: value})


# --- evaluation prompts ----------------------------------------------------------------------


def instance_map(seed: int) -> np.ndarray:
    masks = blobs(seed, n=6).numpy()
    ids = np.zeros((H, W), np.int32)
    for i, m in enumerate(masks):
        ids[m & (ids == 0)] = i + 1
    return ids


def test_eval_prompts_are_tight_deterministic_and_order_independent():
    a, b = instance_map(0), instance_map(1)
    pa = make_instance_prompts(a, seed=3, key="img/a.png")
    torch.manual_seed(123)  # global RNG state must not matter
    make_instance_prompts(b, seed=3, key="img/b.png")
    assert make_instance_prompts(a, seed=3, key="img/a.png") == pa
    json.dumps(pa)  # plain python values
    assert [p["instance"] for p in pa] == sorted(int(i) for i in np.unique(a) if i > 0)
    for p in pa:
        m = a == p["instance"]
        ys, xs = np.nonzero(m)
        assert p["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert all(isinstance(v, int) for v in p["box"])
        (cx, cy), (px, py), (nx, ny) = p["point3"]["points"]
        assert p["point1"]["points"] == [[cx, cy]] and p["point3"]["labels"] == [1, 1, 0]
        assert m[cy, cx] and m[py, px] and not m[ny, nx]
    others = [make_instance_prompts(a, seed=s, key="img/a.png") for s in (4, 5)]
    assert others[0] != pa or others[1] != pa  # the seed matters


def test_save_load_round_trip(tmp_path):
    prompts = {"a.png": make_instance_prompts(instance_map(0), seed=0, key="a.png"), "empty.png": []}
    path = tmp_path / "sub" / "prompts.json"
    save_prompts(path, prompts, seed=0)
    assert load_prompts(path) == prompts
    assert json.loads(path.read_text())["seed"] == 0
    assert [p.name for p in path.parent.iterdir()] == ["prompts.json"]  # no temp file left


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["images"]["a.png"][0].pop("box"), r"image 'a.png', prompt 0: missing 'box'"),
        (lambda d: d["images"]["a.png"][0].update(box=[1, 2, 3]), r"'a.png'.*'box' must be 4 numbers"),
        (lambda d: d["images"]["a.png"][0]["point3"].update(labels=[1]), r"'a.png'.*point3.*labels"),
        (lambda d: d.update(version=7), "unsupported prompt file version"),
    ],
)
def test_load_errors_name_file_and_field(tmp_path, mutate, message):
    path = tmp_path / "p.json"
    save_prompts(path, {"a.png": make_instance_prompts(instance_map(2), seed=0, key="a.png")}, seed=0)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        load_prompts(path)
    assert str(path) in str(err.value)


def test_load_rejects_bad_json_and_save_rejects_bad_prompts(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_prompts(path)
    out = tmp_path / "out.json"
    with pytest.raises(ValueError, match="missing 'point1'"):
        save_prompts(out, {"a.png": [{"instance": 1, "box": [0, 0, 1, 1]}]}, seed=0)
    assert not out.exists()
