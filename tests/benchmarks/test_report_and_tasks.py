"""Report aggregation and verdicts, label subsets, and the seeded artifacts (hand-checked)."""

import numpy as np
import pytest
import torch

from benchmarks.cells import label_subset
from benchmarks.report import aggregate, markdown
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
    md = markdown(list(agg.values()), {})
    assert "**yes** (+0.100)" in md  # 0.7 beats max(0.6 cnn, 0.6 random)
    assert "**0.700 ± 0.141**" in md  # best Dice is bold
    rows[4]["metrics"]["dice"] = 0.5
    md = markdown(aggregate(rows), {})
    assert "no (-0.050)" in md


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
