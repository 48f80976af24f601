"""k-nearest-neighbour classification of frozen features: the label-free readout of a representation.

The protocol of DINO / iBOT's kNN evaluation: features are L2-normalised, the k training samples with the
highest cosine similarity vote for their class with weight ``exp(similarity / temperature)``, and the
normalised votes are the class probabilities. Nothing is trained; ``k`` is chosen on a validation split
(``select_k``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_probs(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, k: int, num_classes: int,
              temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class probabilities of each query from its ``k`` nearest training samples (cosine, weighted votes).

    Args:
        train_x: training features [N, D].
        train_y: their class indices [N].
        query_x: features to classify [M, D].
        k: neighbours (capped at N).
        num_classes: number of classes C.
        temperature: vote weight ``exp(cos / temperature)``; smaller trusts the nearest more.
        chunk: queries per matrix product.

    Returns:
        [M, C] probabilities (rows sum to 1).
    """
    if k < 1 or len(train_x) == 0:
        raise ValueError(f"knn_probs needs k >= 1 and training samples, got k={k}, N={len(train_x)}")
    k = min(k, len(train_x))
    bank = F.normalize(train_x.float(), dim=1)  # [N, D]
    out = []
    for q in F.normalize(query_x.float(), dim=1).split(chunk):  # [m, D]
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_y[idx].long(), (sim / temperature).exp())  # [m, C]
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


def select_k(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
             num_classes: int, score: Callable[[torch.Tensor, torch.Tensor], float],
             ks: Sequence[int] = (1, 3, 5, 10, 20), temperature: float = 0.07) -> tuple[int, dict[int, float]]:
    """The ``k`` with the best validation ``score(probs, targets)`` (the smallest on ties), and every k's score.

    Values of ``k`` above the number of training samples collapse to it and are tried once.
    """
    scores: dict[int, float] = {}
    for k in sorted({min(int(k), len(train_x)) for k in ks}):
        scores[k] = float(score(knn_probs(train_x, train_y, val_x, k, num_classes, temperature).log(), val_y))
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores
