"""Report aggregation and verdicts, label subsets, and the seeded artifacts (hand-checked)."""

import json

import numpy as np
import pytest
import torch

from benchmarks.cells import label_subset
from benchmarks.report import aggregate, curve_charts, length_series, markdown, summary_table, write_all
from benchmarks.stats import comparisons
from benchmarks.tasks.artifacts import ARTIFACTS, apply_artifact, ghosting


def _row(role, row, seed, dice):
    return {"task": "t", "kind": "segmentation", "fraction": 1.0, "seed": seed, "row": row, "protocol": "p",
            "pretraining": row, "data": "-", "backbone": "B", "role": role, "n_train": 10, "seconds": 1.0,
            "metrics": {"dice": dice, "iou": dice / 2}}


def test_aggregate_mean_std_and_verdict():
    rows = [_row("cnn", "cnn", 0, 0.5), _row("cnn", "cnn", 1, 0.7),
            _row("random", "rnd", 0, 0.6), _row("random", "rnd", 1, 0.6),
            _row("pretrained", "mae", 0, 0.8), _row("pretrained", "mae", 1, 0.6)]
    agg = {a["row"]: a for a in aggregate(rows)}
    assert agg["cnn"]["dice"] == pytest.approx(0.6)
    assert agg["cnn"]["dice_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert agg["mae"]["dice"] == pytest.approx(0.7)
    md = markdown(list(agg.values()), {}, comparisons(rows))
    # paired per seed: vs CNN +0.3, -0.1 (t-interval, 1 df: -0.1 +- 12.71 * 0.2); vs random +0.2, 0.0: not decided
    assert "| no: +0.100 [-2.441, +2.641] vs B from scratch |" in md
    assert "**0.700 ± 0.141**" in md  # best Dice is bold
    for r, d in zip(rows, (0.5, 0.5, 0.6, 0.6, 0.8, 0.8)):  # +0.2 over random init and +0.3 over the CNN per seed
        r["metrics"]["dice"] = d
    md = markdown(aggregate(rows), {}, comparisons(rows))
    assert "| **yes**: +0.200 [+0.200, +0.200] vs B random init |" in md


def test_label_subset_count_fraction_stratified():
    y = torch.tensor([0] * 30 + [1] * 10)
    idx = label_subset(y, 8, seed=0, stratify=True)
    assert len(idx) == 8 and (y[idx] == 1).sum() == 2
    y5 = torch.arange(100) % 5
    idx5 = label_subset(y5, 8, seed=1, stratify=True)
    assert len(idx5) == 8 and set(y5[idx5].tolist()) == {0, 1, 2, 3, 4}
    assert len(label_subset(y, 0.5, 0, stratify=False)) == 20
    assert (label_subset(y, 1.0, 0, False) == np.arange(40)).all()
    np.testing.assert_array_equal(label_subset(y, 8, 3, True), label_subset(y, 8, 3, True))
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(y, 41, 0, False)


def test_ghost_amplitude_matches_theory():
    img = np.zeros((32, 32), np.float32)
    img[4:8, 10:14] = 1.0
    phi = 1.0
    out = ghosting(img, np.random.default_rng(0), period=2, phase=phi, axis=0)
    # k-space lines alternately phased: image * |1 + e^{i phi}|/2 plus a copy shifted by H/2 * |1 - e^{i phi}|/2
    assert out[5, 11] == pytest.approx(abs(1 + np.exp(1j * phi)) / 2, abs=1e-5)
    assert out[5 + 16, 11] == pytest.approx(abs(1 - np.exp(1j * phi)) / 2, abs=1e-5)
    assert out[20, 2] == pytest.approx(0.0, abs=1e-5)


def test_artifacts_seeded_and_in_range():
    rng = np.random.default_rng(1)
    img = rng.random((24, 24)).astype(np.float32)
    for name in ARTIFACTS:
        a, b = apply_artifact(img, name, seed=5), apply_artifact(img, name, seed=5)
        np.testing.assert_array_equal(a, b)
        assert a.shape == img.shape and a.min() >= 0 and a.max() <= 1
        if name != "clean":
            assert np.abs(a - img).mean() > 1e-3, name
    with pytest.raises(ValueError, match="unknown artifact"):
        apply_artifact(img, "blur", 0)


def test_summary_table_budgets_by_pretraining_length(tmp_path):
    """Label budgets down, initialisations across in pretraining order; '-' where a row has no cell."""
    def row(role, name, epochs, frac, seed, dice):
        return {**_row(role, name, seed, dice), "fraction": frac, "protocol": "finetune", "pretrain_epochs": epochs,
                "n_train": 4 if frac == 4 else 10}

    rows = [row("cnn", "U-Net", None, f, s, d) for f, s, d in ((4, 0, 0.5), (4, 1, 0.7), (1.0, 0, 0.9), (1.0, 1, 0.9))]
    rows += [row("random", "rnd", 0, f, s, d) for f, s, d in ((4, 0, 0.4), (4, 1, 0.4), (1.0, 0, 0.8), (1.0, 1, 0.8))]
    rows += [{**row("pretrained", "MAE 200 ep", 200, f, s, d), "primary": True}  # the row the answer reads
             for f, s, d in ((4, 0, 0.8), (4, 1, 0.6), (1.0, 0, 0.85), (1.0, 1, 0.85))]
    rows += [{**row("pretrained", "MAE 5 ep", 5, 4, s, 0.45), "primary": False} for s in (0, 1)]
    agg = aggregate(rows)
    lines = summary_table([a for a in agg if a["task"] == "t"])
    assert lines[2] == ("| Labels | B from scratch, finetune | B random init, finetune | MAE 5 ep, finetune | "
                        "MAE 200 ep, finetune |")
    assert lines[4] == "| 4 labelled | 0.600 ± 0.141 | 0.400 ± 0.000 | 0.450 ± 0.000 | **0.700 ± 0.141** |"
    assert lines[5] == "| all (10) | **0.900 ± 0.000** | 0.800 ± 0.000 | - | 0.850 ± 0.000 |"
    assert "| 4 labelled |" in markdown(agg, {}, comparisons(rows))
    paths = curve_charts(agg, tmp_path)
    assert [p.name for p in paths] == ["t_curves.png"] and paths[0].stat().st_size > 10_000
    # the transfer section (docs/transfer.md) is rendered from the results file with the same lines
    from benchmarks.render_readme import render_transfer

    write_all(rows, {"t": {"kind": "segmentation", "data": "toy", "samples": {"train": 10}}}, tmp_path, "Config x.")
    text = render_transfer(json.loads((tmp_path / "results.json").read_text()), str(tmp_path / "results.json"))
    claim = ("- t, 4 labels: MAE 200 ep (finetune) vs B random init (finetune): no difference shown (dice +0.300, "
             "95% CI [-0.971, +1.571] over 2 seeds (2 up / 0 down, sign test p = 0.5)).")
    assert lines[4] in text and claim in text and "Config x." in text
    assert "**Answer:** MAE pretraining does **not** pay off in this run: 0 of 1 tasks show a pretrained ViT" in text
    assert f"]({(tmp_path / 't_curves.png').as_posix()})" in text
    # one label budget and no pretraining length (the 3-D tables: steps, not epochs): nothing to draw, so no
    # curves PNG and no link
    one = [{**r, "pretrain_epochs": None if r["role"] == "pretrained" else r["pretrain_epochs"]}
           for r in rows if r["fraction"] == 1.0]
    single = tmp_path / "single"
    assert curve_charts(aggregate(one), single) == []
    write_all(one, {"t": {"kind": "segmentation", "data": "toy", "samples": {"train": 10}}}, single, "Config y.")
    assert sorted(p.name for p in single.glob("*.png")) == ["t.png"]
    assert "_curves.png" not in render_transfer(json.loads((single / "results.json").read_text()),
                                                str(single / "results.json"))


def test_length_series_keeps_the_random_init_of_its_own_architecture():
    """The pretraining-length curve: its pretrained rows by epochs and, at 0, the random-init row of their backbone;
    a lever's other ViT (patch 4) and its random-init twin stay off it (two points at 0 would draw a zigzag)."""
    def row(role, name, backbone, epochs, seed, dice):
        return {**_row(role, name, seed, dice), "fraction": 4, "n_train": 4, "protocol": "finetune",
                "backbone": backbone, "pretrain_epochs": epochs}

    rows = [row("cnn", "cnn", "ResNet-18", None, s, 0.5) for s in (0, 1)]
    rows += [row("random", "rnd8", "ViT-Ti/8", 0, s, d) for s, d in ((0, 0.2), (1, 0.4))]
    rows += [row("random", "rnd4", "ViT-Ti/4", 0, s, 0.9) for s in (0, 1)]
    rows += [row("pretrained", "MAE 200 ep", "ViT-Ti/8", 200, s, d) for s, d in ((0, 0.6), (1, 0.8))]
    rows += [row("pretrained", "MAE 100 ep", "ViT-Ti/8", 100, s, 0.5) for s in (0, 1)]
    rows += [row("pretrained", "MAE 200 ep, patch 4", "ViT-Ti/4", None, s, 0.7) for s in (0, 1)]
    series = length_series(aggregate(rows), 4, "dice")
    sd = round(float(np.std([0.2, 0.4], ddof=1)), 6)  # = std of (0.6, 0.8)
    assert [(e, round(m, 6), round(s, 6)) for e, m, s in series] == [(0, 0.3, sd), (100, 0.5, 0.0), (200, 0.7, sd)]
    assert length_series(aggregate([r for r in rows if r["pretrain_epochs"] in (0, None)]), 4, "dice") == []


def test_view_geometry():
    """A 2x2 dot moves as stated: shift in half-widths (right, down), rotation ccw on screen, scale about the centre."""
    from benchmarks.tasks.brain import view

    img = np.zeros((32, 32), np.float32)
    img[10:12, 20:22] = 1.0  # centre (row, col) = (10.5, 20.5); the image centre is (15.5, 15.5)

    def centre(a):
        r, c = np.nonzero(a > 0.5 * a.max())
        w = a[r, c]
        return round(float((r * w).sum() / w.sum()), 3), round(float((c * w).sum() / w.sum()), 3)

    assert centre(view(img)) == (10.5, 20.5)
    assert centre(view(img, shift=(0.25, 0.0))) == (10.5, 24.5)  # a quarter of 16 px to the right
    assert centre(view(img, shift=(0.0, 0.25))) == (14.5, 20.5)
    assert centre(view(img, angle=90)) == (10.5, 10.5)  # (right 5, up 5) -> (left 5, up 5)
    assert centre(view(img, scale=0.5)) == (13.0, 18.0)
    filled = view(img, fill=0.5)  # the dot's box (2 px) now spans half the width, centred
    rows = np.flatnonzero((filled > 0.5).any(1))
    assert centre(filled) == (15.5, 15.5) and 15 <= len(rows) <= 17
    np.testing.assert_allclose(view(img, gamma=2.0), img ** 2.0, atol=1e-6)


def test_brain_level_task():
    """Levels ordered vertex -> skull base (slices run S -> I), slab splits, every view distinct, seeded."""
    from benchmarks.tasks.brain import brain_level

    t = brain_level(img_size=32, levels=4, slab=4, gap=2, views=2)
    assert t.kind == "classification" and t.num_classes == 4 and t.class_names[0] == "level 1 (vertex)"
    n = t.info["slices"]
    counts = torch.zeros(4, dtype=torch.long)
    for split in ("train", "val", "test"):
        x, y = t.splits[split]
        assert x.shape[1:] == (1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
        assert len(y) % 2 == 0 and torch.equal(y[0::2], y[1::2])  # two views of each slice, same level
        assert bool((y[1:] >= y[:-1]).all())  # built in S -> I order: levels never go back up
        counts += torch.bincount(y, minlength=4)
        assert all(not torch.equal(a, b) for a, b in zip(x[0::2], x[1::2]))  # every pair: two different views
    # every kept slice in a slab (4 of every 6) is used; levels are equal-count bins of all kept slices
    used = [rank for rank in range(n) if rank % 6 < 4]
    assert int(counts.sum()) == 2 * len(used)
    assert counts.tolist() == [2 * sum(1 for r in used if r * 4 // n == c) for c in range(4)]
    slabs = {s: set(g) for s, g in t.groups.items()}
    assert set().union(*slabs.values()) == {f"slab{r // 6}" for r in used}
    assert not (slabs["train"] & slabs["val"]) and not (slabs["train"] & slabs["test"])
    again = brain_level(img_size=32, levels=4, slab=4, gap=2, views=2)
    assert torch.equal(again.splits["test"][0], t.splits["test"][0])
    with pytest.raises(ValueError, match="views >= 1"):
        brain_level(views=0)
