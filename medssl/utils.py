"""Small shared helpers with no heavy imports."""

from __future__ import annotations

import random

import numpy as np


def stable_seed(*parts: int) -> int:
    """A seed derived from integers, identical in every process (unlike `hash`, which is salted)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int):
    """Seed python, NumPy and torch (the one place that does); returns a torch Generator with the same seed."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
