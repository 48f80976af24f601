"""Classification metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest

from medssl.metrics.classification import (
    accuracy,
    average_ranks,
    binary_auc,
    classification_report,
    confusion_matrix,
    roc_auc,
    sensitivity_per_class,
    specificity_per_class,
)

skm = pytest.importorskip("sklearn.metrics")


def test_confusion_matrix_hand_case():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_sensitivity_specificity_hand_case():
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    # recall: 1/2, 1/1, 2/3 ; specificity of class 0: TN=3 (rows 1,2 cols 1,2), FP=1 -> 3/4
    np.testing.assert_allclose(sensitivity_per_class(cm), [0.5, 1.0, 2 / 3])
    np.testing.assert_allclose(specificity_per_class(cm), [3 / 4, 4 / 5, 3 / 3])


def test_absent_class_is_nan():
    cm = confusion_matrix([0, 0], [0, 1], num_classes=3)
    sens = sensitivity_per_class(cm)
    assert np.isnan(sens[1]) and np.isnan(sens[2]) and sens[0] == 0.5


def test_against_sklearn_random():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 4, 200)
        p = rng.integers(0, 4, 200)
        cm = confusion_matrix(y, p, 4)
        np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=range(4)))
        assert accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
        np.testing.assert_allclose(sensitivity_per_class(cm), skm.recall_score(y, p, average=None))


def test_average_ranks_ties():
    np.testing.assert_allclose(average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_binary_auc_hand_and_ties():
    # pairs (pos, neg): (0.8,0.1)=1 (0.8,0.4)=1 (0.4,0.1)=1 (0.4,0.4)=0.5 -> 3.5/4
    assert binary_auc([1, 0, 1, 0], [0.8, 0.1, 0.4, 0.4]) == pytest.approx(0.875)
    assert np.isnan(binary_auc([1, 1], [0.2, 0.3]))


def test_auc_against_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s)[0] == pytest.approx(skm.roc_auc_score(y, s))
    y3 = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y3]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    macro, per = roc_auc(y3, prob)
    assert macro == pytest.approx(skm.roc_auc_score(y3, prob, multi_class="ovr", average="macro"))
    assert per.shape == (3,)


def test_report_keys_and_binary_two_column():
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    r = classification_report(y, s)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["auc"] == pytest.approx(skm.roc_auc_score(y, s[:, 1]))
    assert r["sensitivity"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="y_true"):
        confusion_matrix([[0, 1]], [0, 1])
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix([0, 3], [0, 1], num_classes=2)
