"""FROC and COCO AP against hand-computed cases and an independent brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.metrics.detection import (
    coco_ap,
    detection_summary,
    froc,
    froc_preprocess,
    random_boxes,
    to_coco_results,
)

A = np.asarray


def _case():
    """Four images, three lesions (one on the image border), two normals (see the hand table)."""
    gts = [A([[10, 10, 30, 30], [100, 100, 120, 120]], float), np.zeros((0, 4)), np.zeros((0, 4)),
           A([[0, 0, 10, 10]], float)]
    boxes = [A([[12, 12, 28, 28], [200, 200, 210, 210], [11, 11, 29, 29], [101, 101, 119, 119]], float),
             A([[50, 50, 60, 60]], float), np.zeros((0, 4)), A([[-4, -4, 12, 12]], float)]
    scores = [A([0.9, 0.8, 0.7, 0.3]), A([0.6]), np.zeros(0), A([0.5])]
    return boxes, scores, gts


def test_froc_center_hand_computed():
    # t:    inf  .9   .8   .7   .6   .5   .3
    # sens:  0  1/3  1/3  1/3  1/3  2/3   1   (p3 re-hits a found lesion: neither TP nor FP)
    # FP:    0   0    1    1    2    2    2   over 4 images
    r = froc(*_case())
    c = r["curve"]
    np.testing.assert_allclose(c["thresholds"], [math.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3])
    np.testing.assert_allclose(c["sensitivity"], [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(c["fps_per_image"], [0, 0, 0.25, 0.25, 0.5, 0.5, 0.5])
    assert r[0.025] == pytest.approx(1 / 3) and r[0.2] == pytest.approx(1 / 3)
    assert r[0.3] == pytest.approx(1 / 3)
    assert r[0.5] == 1.0 and r[1] == 1.0 and r[4] == 1.0
    assert r["num_lesions"] == 3 and r["num_images"] == 4


def test_froc_iou_rule_hand_computed():
    # the border lesion's prediction [-4,-4,12,12]: IoU = 100/256 = 0.39 -> FP at 0.5, hit at 0.3
    r = froc(*_case(), hit="iou", iou_threshold=0.5)
    np.testing.assert_allclose(r["curve"]["sensitivity"], [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(r["curve"]["fps_per_image"], [0, 0, 0.25, 0.25, 0.5, 0.75, 0.75])
    assert r[0.5] == pytest.approx(1 / 3) and r[1] == pytest.approx(2 / 3)
    r3 = froc(*_case(), hit="iou", iou_threshold=0.3)
    assert r3[0.5] == 1.0


def test_froc_uses_y_for_y():
    # a tall lesion away from the diagonal: the centre (5, 55) is inside; a centre built from the x
    # coordinates for y (the reference's bug) would be (5, 5) and miss it
    r = froc([A([[0, 50, 10, 60.]])], [A([0.7])], [A([[2, 50, 8, 60.]])])
    assert r[0.025] == 1.0
    # the transposed box must miss
    r = froc([A([[50, 0, 60, 10.]])], [A([0.7])], [A([[2, 50, 8, 60.]])])
    assert r[4] == 0.0 and r["curve"]["fps_per_image"][-1] == 1.0


def test_froc_border_inclusive_and_crowded():
    # centre exactly on the lesion's left/top border counts as a hit
    r = froc([A([[-5, -5, 5, 5.]])], [A([0.5])], [A([[0, 0, 20, 20.]])])
    assert r[0.025] == 1.0
    # crowded: one prediction whose centre (25, 25) is inside two overlapping lesions finds both;
    # a second prediction on them is neither; a third elsewhere is the only FP
    gts = [A([[10, 10, 30, 30], [20, 20, 40, 40], [60, 60, 70, 70]], float)]
    boxes = [A([[20, 20, 30, 30], [21, 21, 29, 29], [90, 90, 95, 95]], float)]
    r = froc(boxes, [A([0.9, 0.8, 0.4])], gts)
    np.testing.assert_allclose(r["curve"]["sensitivity"], [0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r["curve"]["fps_per_image"], [0, 0, 0, 1])


def test_froc_ties_and_normals_only_fp():
    # equal scores enter together; two normal images share the FP count
    gts = [A([[0, 0, 10, 10.]]), np.zeros((0, 4)), np.zeros((0, 4))]
    boxes = [A([[2, 2, 8, 8.]]), A([[0, 0, 5, 5.]]), A([[0, 0, 5, 5.]])]
    r = froc(boxes, [A([0.5]), A([0.5]), A([0.2])], gts)
    np.testing.assert_allclose(r["curve"]["thresholds"], [math.inf, 0.5, 0.2])
    np.testing.assert_allclose(r["curve"]["sensitivity"], [0, 1, 1])
    np.testing.assert_allclose(r["curve"]["fps_per_image"], [0, 1 / 3, 2 / 3])
    assert r[0.3] == 0.0 and r[0.5] == 1.0


def _brute_force(boxes, scores, gts, k, hit, thr):
    """Literal per-threshold implementation of the rule, written independently of the module."""
    all_s = sorted({float(s) for sc in scores for s in sc}, reverse=True)
    best = 0.0
    total = sum(len(g) for g in gts)
    for t in [math.inf, *all_s]:
        found, fp = 0, 0
        for b, s, g in zip(boxes, scores, gts):
            kept = [bb for bb, ss in zip(b, s) if ss >= t]
            done = [False] * len(g)
            for bb in kept:
                any_hit = False
                for j, gg in enumerate(g):
                    if hit == "center":
                        cx, cy = (bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2
                        h = gg[0] <= cx <= gg[2] and gg[1] <= cy <= gg[3]
                    else:
                        iw = max(0.0, min(bb[2], gg[2]) - max(bb[0], gg[0]))
                        ih = max(0.0, min(bb[3], gg[3]) - max(bb[1], gg[1]))
                        inter = iw * ih
                        union = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (gg[2] - gg[0]) * (gg[3] - gg[1]) - inter
                        h = union > 0 and inter / union >= thr
                    if h:
                        any_hit = True
                        done[j] = True
                fp += not any_hit
            found += sum(done)
        if fp / len(gts) <= k:
            best = max(best, found / total)
    return best


@pytest.mark.parametrize("hit", ["center", "iou"])
def test_froc_matches_brute_force(hit):
    rng = np.random.default_rng(0)
    boxes, scores, gts = [], [], []
    for _ in range(12):
        m = int(rng.integers(0, 3))
        xy = rng.uniform(0, 80, (m, 2))
        gts.append(np.concatenate([xy, xy + rng.uniform(5, 20, (m, 2))], 1))
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (k, 2))
        boxes.append(np.concatenate([xy, xy + rng.uniform(5, 20, (k, 2))], 1))
        scores.append(np.round(rng.uniform(0, 1, k), 1))  # rounding creates ties
    r = froc(boxes, scores, gts, hit=hit, iou_threshold=0.2)
    for k in (0.1, 0.3, 1, 2):
        assert r[k] == pytest.approx(_brute_force(boxes, scores, gts, k, hit, 0.2))


def test_froc_accepts_tensors_and_rejects_bad_input():
    torch = pytest.importorskip("torch")
    r = froc([torch.tensor([[0, 0, 4, 4.]])], [torch.tensor([0.3])], [torch.tensor([[0, 0, 4, 4.]])])
    assert r[0.3] == 1.0
    with pytest.raises(ValueError, match="one entry per image"):
        froc([np.zeros((0, 4))], [], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="hit"):
        froc([np.zeros((0, 4))], [np.zeros(0)], [np.zeros((0, 4))], hit="centre")
    with pytest.raises(ValueError, match=r"pred_boxes\[0\]"):
        froc([np.zeros((2, 3))], [np.zeros(2)], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        froc([np.zeros((2, 4))], [np.zeros(1)], [np.zeros((0, 4))])
    r = froc([np.zeros((1, 4))], [A([0.5])], [np.zeros((0, 4))])  # no lesions anywhere
    assert math.isnan(r["curve"]["sensitivity"][-1])


def test_froc_preprocess_sigmoid_and_nms():
    boxes = A([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], float)
    logits = A([0.0, 2.0, -1.0, 1.0])
    b, s = froc_preprocess(boxes, logits, logits=True)
    # IoU(box1, box0) = 81/119 = 0.68 > 0.1 -> box0 and box3 suppressed by box1 (highest score)
    np.testing.assert_allclose(s, [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))], rtol=1e-6)
    np.testing.assert_allclose(b, [[1, 1, 11, 11], [20, 20, 30, 30]])
    b, s = froc_preprocess(boxes[:2], A([[0.2, 0.6], [0.5, 0.1]]))  # per-class -> best class
    np.testing.assert_allclose(s, [0.6], rtol=1e-6)


def _gt():
    return {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 40, 60]}],
            "categories": [{"id": 1, "name": "lesion"}]}


def test_coco_ap_hand_cases():
    gt = _gt()
    perfect = to_coco_results([1, 2], [A([[0, 0, 100, 100.]]), A([[50, 50, 90, 110.]])], [A([0.9]), A([0.8])])
    assert perfect[1]["bbox"] == [50.0, 50.0, 40.0, 60.0]
    r = coco_ap(gt, perfect)
    assert (r["AP"], r["AP50"], r["AP75"]) == pytest.approx((1.0, 1.0, 1.0))
    assert coco_ap(gt, [])["AP"] == 0.0
    # IoU 0.62 on both images: matched at 0.50, 0.55, 0.60 of the ten thresholds -> AP 0.3
    shifted = to_coco_results([1, 2], [A([[0, 0, 100, 62.]]), A([[50, 50, 90, 87.2]])], [A([0.9]), A([0.8])])
    r = coco_ap(gt, shifted)
    assert (r["AP50"], r["AP75"], r["AP"]) == pytest.approx((1.0, 0.0, 0.3))
    # a false positive ranked above the only true positive of a one-image set: precision 0.5 at recall 1
    one = {**gt, "images": gt["images"][:1], "annotations": gt["annotations"][:1]}
    ranked = to_coco_results([1], [A([[150, 150, 190, 190], [0, 0, 100, 100.]])], [A([0.9, 0.8])])
    assert coco_ap(one, ranked)["AP50"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="categories"):
        coco_ap({"images": [], "annotations": []}, perfect)


def test_random_boxes_baseline():
    sizes = [(100, 80), (50, 60)]
    wh = A([[10, 20], [30, 5]], float)
    boxes, scores = random_boxes(sizes, wh, boxes_per_image=50, seed=1)
    for (h, w), b, s in zip(sizes, boxes, scores):
        assert b.shape == (50, 4) and s.shape == (50,) and ((0 <= s) & (s <= 1)).all()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        got = {tuple(np.round(r, 6)) for r in np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)}
        assert got <= {(10.0, 20.0), (30.0, 5.0)}
    again, _ = random_boxes(sizes, wh, boxes_per_image=50, seed=1)
    np.testing.assert_array_equal(boxes[0], again[0])
    with pytest.raises(ValueError, match="box_wh"):
        random_boxes(sizes, np.zeros((0, 2)))


def test_detection_summary_flat_and_consistent():
    boxes, scores, gts = _case()
    s = detection_summary(boxes, scores, gts)
    assert s["R@0.3"] == pytest.approx(1 / 3) and s["R@0.5"] == 1.0 and s["num_lesions"] == 3
    # perfect predictions on a COCO file built from the same ground truth: R@k = 1, AP = 1
    coco = {"images": [{"id": i + 1, "width": 300, "height": 300} for i in range(len(gts))],
            "annotations": [{"id": 10 * i + j + 1, "image_id": i + 1, "category_id": 1,
                             "bbox": [g[0], g[1], g[2] - g[0], g[3] - g[1]]}
                            for i, gi in enumerate(gts) for j, g in enumerate(gi)],
            "categories": [{"id": 1, "name": "lesion"}]}
    s = detection_summary(gts, [np.ones(len(g)) for g in gts], gts, coco_gt=coco, image_ids=[1, 2, 3, 4])
    assert s["R@0.025"] == 1.0 and s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_ids"):
        detection_summary(gts, [np.ones(len(g)) for g in gts], gts, coco_gt=coco)
