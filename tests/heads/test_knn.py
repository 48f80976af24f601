"""kNN on frozen features against a brute-force reference (cosine, exp(s / T) votes) and hand-made cases."""

import math

import pytest
import torch

from medssl.heads.knn import knn_probs, select_k


def _reference(train_x, train_y, q, k, c, t):
    """Loop over queries: cosine to every training sample, the k largest vote exp(s / t) for their class."""
    out = []
    for x in q:
        sims = [float(torch.dot(x, y) / (x.norm() * y.norm())) for y in train_x]
        top = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * c
        for i in top:
            votes[int(train_y[i])] += math.exp(sims[i] / t)
        out.append([v / sum(votes) for v in votes])
    return torch.tensor(out)


def test_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_x, train_y, q = torch.randn(30, 8, generator=g), torch.randint(0, 3, (30,), generator=g), torch.randn(7, 8)
    for k in (1, 5, 30):
        torch.testing.assert_close(knn_probs(train_x, train_y, q, k, 3, 0.1, chunk=3),
                                   _reference(train_x, train_y, q, k, 3, 0.1), rtol=1e-5, atol=1e-6)


def test_hand_cases_and_k_selection():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    probs = knn_probs(train_x, train_y, torch.tensor([[0.1, 1.0]]), 1, 2)
    assert probs.tolist() == [[0.0, 1.0]]  # the nearest is the only class-1 sample
    # with k = 3 the two class-0 samples outvote it when they are nearly as close
    assert knn_probs(train_x, train_y, torch.tensor([[1.0, 1.0]]), 3, 2, temperature=1.0)[0, 0] > 0.5

    def acc(logp, y):
        return float((logp.argmax(1) == y).float().mean())

    val_x, val_y = torch.tensor([[0.5, 1.0], [1.0, 0.05]]), torch.tensor([1, 0])
    # first: cosines 0.447 / 0.543 (class 0) and 0.894 (class 1); at T = 1 the k = 3 votes are 3.29 vs 2.45
    k, scores = select_k(train_x, train_y, val_x, val_y, 2, acc, ks=(1, 3, 10), temperature=1.0)
    assert scores == {1: 1.0, 3: 0.5} and k == 1  # k = 10 collapses to 3; k = 3 lets class 0 win the first
    with pytest.raises(ValueError, match="k >= 1"):
        knn_probs(train_x, train_y, val_x, 0, 2)
