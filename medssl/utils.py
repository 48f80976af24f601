"""Small shared helpers with no heavy imports."""

from __future__ import annotations

import numpy as np


def stable_seed(*parts: int) -> int:
    """A seed derived from integers, identical in every process (unlike `hash`, which is salted)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
