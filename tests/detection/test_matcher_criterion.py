"""Box ops, Hungarian matcher and set criterion against hand computations and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medssl.detection.box_ops import (
    cxcywh_to_xyxy,
    generalized_box_iou,
    inverse_sigmoid,
    normalize_xyxy,
    xyxy_to_cxcywh,
)
from medssl.detection.criterion import SetCriterion
from medssl.detection.matcher import HungarianMatcher


def test_box_round_trip_and_normalize():
    b = torch.rand(3, 5, 4)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)
    torch.testing.assert_close(normalize_xyxy(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 50),
                               torch.tensor([[0.4, 0.4, 0.4, 0.4]]))
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.2, 0.5])).sigmoid(), torch.tensor([0.2, 0.5]))


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    # overlap: inter 1, union 7, hull 9 -> 1/7 - 2/9; disjoint: inter 0, union 5, hull 10 -> 0 - 5/10
    expected = torch.tensor([[1 / 7 - (9 - 7) / 9, 0 - (10 - 5) / 10]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def _brute_force(cost: torch.Tensor) -> float:
    q, k = cost.shape
    return min(sum(cost[p[j], j].item() for j in range(k)) for p in itertools.permutations(range(q), k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_optimal_vs_permutations(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = 5, 3
    outputs = {"pred_logits": torch.randn(1, q, 2, generator=g),
               "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.4 + 0.1}
    tgt = {"labels": torch.tensor([0, 1, 1]), "boxes": torch.rand(k, 4, generator=g) * 0.4 + 0.1}
    m = HungarianMatcher()
    (rows, cols), = m(outputs, [tgt])
    # independent cost: focal class cost, L1, GIoU written out by hand
    p = outputs["pred_logits"][0].sigmoid()
    cost = torch.zeros(q, k)
    for i in range(q):
        for j in range(k):
            pj = p[i, tgt["labels"][j]]
            c_cls = 0.25 * (1 - pj) ** 2 * -math.log(pj + 1e-8) - 0.75 * pj**2 * -math.log(1 - pj + 1e-8)
            c_l1 = (outputs["pred_boxes"][0, i] - tgt["boxes"][j]).abs().sum()
            bi, bj = cxcywh_to_xyxy(outputs["pred_boxes"][0, i]), cxcywh_to_xyxy(tgt["boxes"][j])
            iw = (torch.minimum(bi[2], bj[2]) - torch.maximum(bi[0], bj[0])).clamp(min=0)
            ih = (torch.minimum(bi[3], bj[3]) - torch.maximum(bi[1], bj[1])).clamp(min=0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            union = area(bi) + area(bj) - iw * ih
            hull = ((torch.maximum(bi[2], bj[2]) - torch.minimum(bi[0], bj[0]))
                    * (torch.maximum(bi[3], bj[3]) - torch.minimum(bi[1], bj[1])))
            giou = iw * ih / union - (hull - union) / hull
            cost[i, j] = 2 * c_cls + 5 * c_l1 - 2 * giou
    assert len(rows) == k and sorted(cols.tolist()) == list(range(k))
    assert cost[rows, cols].sum().item() == pytest.approx(_brute_force(cost), abs=1e-4)


def test_matcher_empty_targets_and_bad_weights():
    out = {"pred_logits": torch.randn(1, 4, 1), "pred_boxes": torch.rand(1, 4, 4)}
    (r, c), = HungarianMatcher()(out, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert len(r) == len(c) == 0
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)


def test_criterion_matches_direct_formulas():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.2], [0.8, 0.8, 0.3, 0.1]]])
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.52, 0.48, 0.2, 0.25]])}]
    crit = SetCriterion(num_classes=2)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, tgt)
    (rows, _), = crit.matcher({"pred_logits": logits, "pred_boxes": boxes}, tgt)
    assert rows.tolist() == [0]  # the overlapping prediction is matched
    # focal loss by its formula: -alpha_t (1 - p_t)^gamma log(p_t), mean over queries, sum, / num_boxes, * Q
    target = torch.zeros(3, 2)
    target[0, 1] = 1
    p = logits[0].sigmoid()
    p_t = torch.where(target == 1, p, 1 - p)
    alpha_t = torch.where(target == 1, 0.25, 0.75)
    # mean over queries, sum over classes, / num_boxes (1), * Q queries
    focal = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum() / 3 * 3
    assert losses["loss_ce"].item() == pytest.approx(2 * focal.item(), rel=1e-5)
    l1 = (boxes[0, 0] - tgt[0]["boxes"][0]).abs().sum()
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1.item(), rel=1e-5)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes[0, :1]), cxcywh_to_xyxy(tgt[0]["boxes"]))[0, 0]
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - giou.item()), rel=1e-5)


def test_criterion_aux_keys_and_bad_classes():
    out = {"pred_logits": torch.randn(2, 4, 1), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.2}
    out["aux_outputs"] = [dict(out), dict(out)]
    tg = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
          {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(1)(out, tg)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    torch.testing.assert_close(losses["loss_ce_0"], losses["loss_ce"])
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0)


def test_criterion_computes_in_float32_from_bf16_heads():
    """bf16 head outputs (autocast) give the float32 loss of the same rounded values: targets are not rounded
    to bf16 and the sums run in float32."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 1, generator=g).bfloat16()
    boxes = (torch.rand(2, 5, 4, generator=g) * 0.5 + 0.25).bfloat16()
    targets = [{"labels": torch.zeros(2, dtype=torch.long), "boxes": torch.tensor([[0.3011, 0.4017, 0.1003, 0.2009],
                                                                                  [0.6021, 0.5013, 0.2007, 0.1001]])},
               {"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.tensor([[0.5003, 0.5007, 0.3001, 0.3003]])}]
    crit = SetCriterion(num_classes=1)
    got = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    ref = crit({"pred_logits": logits.float(), "pred_boxes": boxes.float()}, targets)
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
