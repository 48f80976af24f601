"""MedMask pieces: token masking, feature MAE, expert distillation, EMA, pseudo-labels, selective retraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.detection.detr import build_detector, demo_detector_config
from medssl.detection.medmask import (
    EmbeddingStore,
    ExpertDistiller,
    FeatureMAE,
    ema_update,
    medmask_threshold,
    mrt_threshold,
    non_decoder_names,
    pseudo_labels,
    random_token_masks,
    region_embeddings,
    reset_non_decoder,
)


def _small_model():
    torch.manual_seed(0)
    cfg = demo_detector_config(backbone_name="resnet10t", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                               dim_feedforward=64, num_queries=6)
    model = build_detector(cfg)
    mae = FeatureMAE(32, model.backbone.num_channels[-1], level=2, n_levels=4, n_heads=2, n_points=4,
                     num_layers=1, dim_feedforward=64)
    return model, mae


def _mixed_batch():
    x = torch.randn(2, 1, 128, 96)
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, 64:, :] = True  # the second image is 64 x 96: a smaller image padded in the batch
    x[1, :, 64:] = 0
    return x, mask


def test_random_token_masks_ratio_and_padding():
    pad = torch.zeros(4, 40, 50, dtype=torch.bool)
    pad[:, :, 25:] = True
    (m,) = random_token_masks([pad], 0.8, torch.Generator().manual_seed(0))
    assert not (m & pad).any()
    assert abs(m[~pad].float().mean().item() - 0.8) < 0.03
    with pytest.raises(ValueError, match="mask ratio"):
        random_token_masks([pad], 1.0)


def test_feature_mae_loss_is_masked_mse_of_detached_c5():
    model, mae = _small_model()
    x, mask = _mixed_batch()
    out = model(x, mask, mask_ratio=0.8)
    feats = out["features"]
    captured = {}
    mae.head.register_forward_hook(lambda mod, inp, o: captured.setdefault("pred", o))
    loss = mae(feats, feats["token_masks"])
    # independent: mean over channels of the squared error, averaged over hidden tokens of level 2
    pred = captured["pred"]  # [N, h*w, C5]
    c5 = feats["backbone"][-1]  # [N, C5, h, w]
    hidden = feats["token_masks"][2]  # [N, h, w]
    errs = []
    for n in range(c5.shape[0]):
        for i in range(c5.shape[2]):
            for j in range(c5.shape[3]):
                if hidden[n, i, j]:
                    k = i * c5.shape[3] + j
                    errs.append(((pred[n, k] - c5[n, :, i, j]) ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(errs).mean().item(), rel=1e-5)
    assert not (hidden & feats["pad_masks"][2]).any()  # padding of the small image is never a target
    loss.backward()
    assert mae.mask_token.grad is not None and model.input_proj[0][0].weight.grad is not None
    # the backbone learns through the encoder input path (the reconstruction target itself is detached)
    assert any(p.grad is not None for p in model.backbone.parameters())


def test_hidden_tokens_do_not_leak():
    model, _ = _small_model()
    model.eval()
    x, mask = _mixed_batch()
    feats, srcs, masks, _ = model.multiscale(x, mask)
    hidden = random_token_masks(masks, 0.5, torch.Generator().manual_seed(1))
    ref = model(x, mask, token_masks=hidden)
    noise = {}

    def perturb(mod, inp, out):  # change the projected features of hidden level-0 tokens only
        noise["n"] = torch.randn_like(out) * 10 * hidden[0][:, None]
        return out + noise["n"]

    h = model.input_proj[0].register_forward_hook(perturb)
    try:
        out = model(x, mask, token_masks=hidden)
    finally:
        h.remove()
    assert noise["n"].abs().sum() > 0
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"])
    torch.testing.assert_close(out["features"]["memory"], ref["features"]["memory"])


def test_embedding_store(tmp_path):
    np.save(tmp_path / "a_embedding.npy", np.ones((3, 8), np.float32))
    np.save(tmp_path / "b_embedding.npy", np.ones(8, np.float32))
    np.save(tmp_path / "c_embedding.npy", np.ones((2, 5), np.float32))
    np.save(tmp_path / "d_embedding.npy", np.ones((2, 8), np.int64))
    store = EmbeddingStore(tmp_path)
    assert store.load("x/a.png").shape == (3, 8)
    assert store.load("y/b.dcm").shape == (1, 8)
    with pytest.raises(ValueError, match="width 5"):
        store.load("c.png")
    with pytest.raises(ValueError, match="float"):
        store.load("d.png")
    with pytest.raises(FileNotFoundError, match="e_embedding.npy"):
        store.load("e.png")
    lenient = EmbeddingStore(tmp_path, skip_missing=True)
    assert lenient.load("e.png") is None and lenient.missing == 1
    with pytest.raises(FileNotFoundError, match="embeddings folder"):
        EmbeddingStore(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["infonce", "margin"])
def test_distiller_matches_direct_formula(mode):
    torch.manual_seed(0)
    dist = ExpertDistiller(16, 8, proj_dim=6, temperature=0.2, mode=mode, margin=0.3)
    q = torch.randn(3, 5, 16)
    embs = [torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(8)[None]]
    q = torch.cat([q, torch.randn(1, 5, 16)])
    loss = dist(q, embs)
    keep = [0, 2, 3]
    s = [F.normalize(dist.student(q[i].mean(0)), dim=0) for i in keep]
    e = [F.normalize(dist.expert(embs[i].mean(0)), dim=0) for i in keep]
    sim = [[float((s[i] @ e[j]).detach()) for j in range(3)] for i in range(3)]
    if mode == "infonce":
        row = [-(sim[i][i] / 0.2 - math.log(sum(math.exp(sim[i][j] / 0.2) for j in range(3)))) for i in range(3)]
        col = [-(sim[j][j] / 0.2 - math.log(sum(math.exp(sim[i][j] / 0.2) for i in range(3)))) for j in range(3)]
        expected = 0.5 * (sum(row) / 3 + sum(col) / 3)
    else:
        terms = [max(0.0, 0.3 - sim[i][i] + sim[i][j]) for i in range(3) for j in range(3) if i != j]
        expected = sum(terms) / len(terms)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert dist.student[0].weight.grad is not None and dist.expert[0].weight.grad is not None
    assert dist(q[:1], embs[:1]).item() == 0.0  # no negatives
    with pytest.raises(ValueError, match="mode"):
        ExpertDistiller(16, 8, mode="cosine")


def test_medmask_distillation_hand_computed():
    """The reference form on a case worked by hand: identity-like fixed projections (2 -> 256, the rest zero),
    queries truncated to the expert's 2 rows and L2-normalised per query, flattened, normalised; margin 1."""
    dist = ExpertDistiller(2, 2, mode="medmask")
    assert dist.margin == 1.0 and dist.student.out_features == 256 and dist.expert.out_features == 256
    assert not any(p.requires_grad for p in dist.parameters())  # fixed random projections, never trained
    with torch.no_grad():
        for lin in (dist.student, dist.expert):
            lin.weight.zero_()
            lin.weight[:2] = torch.eye(2)
            lin.bias.zero_()
    q = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]],  # -> [.6, .8], [1, 0]; query 2 truncated away
                      [[0.0, 2.0], [0.0, -1.0], [9.0, 9.0]],  # -> [0, 1], [0, -1]
                      [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]], requires_grad=True)  # no embedding: skipped
    embs = [torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.8, 0.6]]), None]
    # flattened and normalised: s0 = e0 = [.6, .8, 1, 0] / sqrt2, s1 = [0, 1, 0, -1] / sqrt2,
    # e1 = [.6, .8, .8, .6] / sqrt2
    # d2(s0, e0) = 0; d2(s1, e1) = (.36 + .04 + .64 + 2.56) / 2 = 1.8 (same image: d^2)
    # d2(s0, e1) = (.04 + .36) / 2 = 0.2 -> (1 - sqrt(.2))^2; d2(s1, e0) = 2.4 / 2 = 1.2 -> d > 1 -> 0
    expected = (0.0 + 1.8 + (1 - math.sqrt(0.2)) ** 2 + 0.0) / 4
    loss = dist(q, embs)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert q.grad[:2, :2].abs().sum() > 0 and q.grad[:, 2].abs().sum() == 0 and q.grad[2].abs().sum() == 0
    assert dist(q, embs).item() == pytest.approx(expected, rel=1e-6)  # the same projections on every call


def test_region_embeddings_match_brute_force():
    torch.manual_seed(0)
    g, d = 3, 5
    tokens = torch.randn(g * g, d, dtype=torch.float64)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.4, 0.4, 0.45, 0.41],
                          [-0.2, 0.7, 0.3, 1.3], [0.34, 0.0, 0.66, 0.32]], dtype=torch.float64)
    got = region_embeddings(tokens, boxes)
    for k, (x0, y0, x1, y1) in enumerate(boxes.clamp(0, 1).tolist()):
        acc, total = torch.zeros(d, dtype=torch.float64), 0.0
        for r in range(g):
            for c in range(g):
                ox = max(0.0, min(x1, (c + 1) / g) - max(x0, c / g))
                oy = max(0.0, min(y1, (r + 1) / g) - max(y0, r / g))
                acc += ox * oy * tokens[r * g + c]
                total += ox * oy
        torch.testing.assert_close(got[k], acc / total)
    torch.testing.assert_close(got[1], tokens.mean(0))  # the whole image: the plain mean
    with pytest.raises(ValueError, match="square grid"):
        region_embeddings(torch.randn(5, d), boxes)


def test_object_distillation_matches_direct_formula():
    torch.manual_seed(0)
    dist = ExpertDistiller(8, 4, proj_dim=6, temperature=0.5, mode="object", regions=2, grid_offset=1)
    q = torch.randn(3, 4, 8)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.3, 1.0], [0.2, 0.2, 0.8, 0.8]])
    boxes = boxes[None].repeat(3, 1, 1)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    embs = [torch.randn(1 + 4, 4), None, torch.randn(1 + 4, 4)]  # cls + a 2 x 2 grid
    loss = dist(q, embs, boxes, scores)
    picks = [(0, 0), (0, 2), (2, 3), (2, 2)]  # the two highest-scoring queries of each image with an embedding
    s = [F.normalize(dist.student(q[i, j]), dim=0) for i, j in picks]
    e = [F.normalize(dist.expert(region_embeddings(embs[i][1:], boxes[i, j:j + 1])[0]), dim=0) for i, j in picks]
    sim = [[float((s[a] @ e[b]).detach()) / 0.5 for b in range(4)] for a in range(4)]
    row = [-(sim[a][a] - math.log(sum(math.exp(sim[a][b]) for b in range(4)))) for a in range(4)]
    col = [-(sim[b][b] - math.log(sum(math.exp(sim[a][b]) for a in range(4)))) for b in range(4)]
    assert loss.item() == pytest.approx(0.5 * (sum(row) / 4 + sum(col) / 4), rel=1e-5)
    with pytest.raises(ValueError, match="boxes"):
        dist(q, embs)


def test_mrt_threshold_hand_computed():
    assert mrt_threshold(0.3, 0.64, t_max=0.5) == pytest.approx(0.9 * 0.3 + 0.1 * 0.5 * 0.8)  # 0.31
    assert mrt_threshold(0.25, 0.0, t_max=0.5) == pytest.approx(0.25)  # 0.225 clipped up to 0.25
    assert mrt_threshold(0.6, 1.0, t_max=0.45) == pytest.approx(0.45)  # 0.59 clipped down to t_max
    t = 0.3
    for _ in range(2):
        t = mrt_threshold(t, 0.81, t_max=0.6)
    assert t == pytest.approx(0.9 * (0.9 * 0.3 + 0.045) + 0.045)  # 0.3285
    with pytest.raises(ValueError, match="matched score"):
        mrt_threshold(0.3, 1.5, t_max=0.5)


def test_medmask_threshold_schedule_hand_computed():
    assert medmask_threshold(0, 10) == pytest.approx(0.1)
    delta = 2 / (1 + math.exp(-0.5)) - 1  # 0.24492
    assert medmask_threshold(5, 10) == pytest.approx(0.1 + 0.7 * delta)  # 0.27144
    assert medmask_threshold(10, 10) == pytest.approx(0.1 + 0.7 * (2 / (1 + math.exp(-1)) - 1))  # 0.42349
    with pytest.raises(ValueError, match="epochs"):
        medmask_threshold(0, 0)


def test_ema_update_formula():
    t, s = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = t.weight.detach().clone()
    ema_update(t, s, 0.9)
    torch.testing.assert_close(t.weight, 0.9 * before + 0.1 * s.weight)
    with pytest.raises(ValueError, match="alpha"):
        ema_update(t, s, 1.5)


def test_pseudo_labels_threshold_and_nms():
    logits = torch.logit(torch.tensor([[[0.9], [0.8], [0.2], [0.7]]]))
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.505, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1],
                           [0.5, 0.52, 0.2, 0.2]]])
    # query 1 overlaps query 0 with IoU ~0.95 (> 0.7): removed; query 3 IoU ~0.82: removed at 0.7, kept at 0.9
    (pl,) = pseudo_labels({"pred_logits": logits, "pred_boxes": boxes}, threshold=0.5, nms_iou=0.7)
    assert pl["scores"].tolist() == pytest.approx([0.9])
    torch.testing.assert_close(pl["boxes"], boxes[0, :1])
    (pl,) = pseudo_labels({"pred_logits": logits, "pred_boxes": boxes}, threshold=0.5, nms_iou=0.9)
    assert pl["scores"].tolist() == pytest.approx([0.9, 0.7])


def test_reset_non_decoder_keeps_decoder_and_heads():
    model, _ = _small_model()
    names = set(non_decoder_names(model))
    assert any(n.startswith("transformer.encoder.") for n in names)
    assert not any(n.startswith(("transformer.decoder.", "class_embed.", "bbox_embed.")) for n in names)
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert reset_non_decoder(model, snap) == len(snap)
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p, snap[n])
    dec = dict(model.named_parameters())["transformer.decoder.layers.0.norm1.weight"]
    assert dec.detach().mean().item() == pytest.approx(2.0)  # LayerNorm weight 1 + 1, untouched


def test_pseudo_label_quality_hand_computed():
    """A stub teacher with fixed outputs: precision / recall of its pseudo-labels counted by hand."""
    from torch import nn

    from medssl.detection.evaluation import pseudo_label_quality

    class Images(torch.utils.data.Dataset):  # two images, truth boxes normalised cxcywh
        truth = [torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]), torch.zeros(0, 4)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8), {"boxes": self.truth[i], "labels": torch.zeros(len(self.truth[i]))}

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, images, mask):
            # image 0: a hit on lesion 1 (IoU 1), a near miss on lesion 2 (IoU < 0.5), a second box on lesion 1
            # (IoU 0.54 with it, 0.54 < 0.7 with the first: NMS keeps it; one-to-one: wrong);
            # image 1 (normal): one false positive
            boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.75, 0.75, 0.2, 0.2], [0.23, 0.2, 0.1, 0.1]],
                                  [[0.5, 0.5, 0.1, 0.1], [0.1, 0.9, 0.05, 0.05], [0.3, 0.3, 0.05, 0.05]]])
            scores = torch.tensor([[0.9, 0.8, 0.6], [0.7, 0.1, 0.1]])
            return {"pred_logits": torch.logit(scores)[..., None], "pred_boxes": boxes[: len(images)]}

    cfg = {"data": {"batch_size": 2}}
    q = pseudo_label_quality(Teacher(), Images(), cfg, threshold=0.5, nms_iou=0.7, device=torch.device("cpu"))
    # IoU of [0.75,0.75,.2,.2] with [0.7,0.7,.2,.2]: overlap 0.15^2 / (2 * 0.04 - 0.0225) = 0.391 < 0.5
    assert q == {"pseudo_precision": 1 / 4, "pseudo_recall": 1 / 2, "pseudo_per_image": 2.0, "true_per_image": 1.0}


def test_ema_of_a_bf16_teacher_moves_like_float32():
    """A bf16 teacher (DeepSpeed bf16) averaged through float32 shadows follows the float32 EMA; without them
    0.9996 x 100 steps leaves it nearly where it started."""
    torch.manual_seed(0)
    student = torch.nn.Linear(8, 8)
    ref, plain, shadowed = (torch.nn.Linear(8, 8) for _ in range(3))
    for m in (plain, shadowed):
        m.load_state_dict(ref.state_dict())
    plain, shadowed = plain.bfloat16(), shadowed.bfloat16()
    ref.load_state_dict({k: v.bfloat16().float() for k, v in ref.state_dict().items()})  # same start
    shadow = [p.detach().float().clone() for p in shadowed.parameters()]
    start = [p.detach().clone() for p in plain.parameters()]
    for _ in range(100):
        ema_update(ref, student, 0.9996)
        ema_update(plain, student.bfloat16(), 0.9996)
        ema_update(shadowed, student.bfloat16(), 0.9996, shadow)
        student.float()
    moved_ref = moved_plain = 0.0
    for r, s, p0, p in zip(ref.parameters(), shadowed.parameters(), start, plain.parameters()):
        torch.testing.assert_close(s.float(), r.detach().bfloat16().float(), rtol=0, atol=0)
        moved_ref += float((r.detach() - p0.float()).abs().sum())
        moved_plain += float((p.detach().float() - p0.float()).abs().sum())
    assert moved_plain < 0.1 * moved_ref  # the rounding swallows nearly every update
