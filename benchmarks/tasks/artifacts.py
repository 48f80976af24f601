"""Seeded image artifacts for the image-quality-control task (images in [0, 1], shape [H, W]).

Severities are drawn so that every artifact is plainly visible at 64 px (`VERSION` names the set;
it is part of the benchmark cache key).

- ghosting: MR motion ghosts. Every n-th phase-encoding line of k-space gets a phase error phi,
  which adds a copy of the image shifted by H/n (or W/n) with amplitude sin(phi / 2) for n = 2.
- noise: Rician noise, |x + n1 + i n2| with Gaussian n1, n2 of std sigma.
- bias: smooth multiplicative intensity inhomogeneity, exp(a * p(u, v)) with p a random
  second-order polynomial scaled to [-1, 1].
- ring: CT ring artifact, concentric bright/dark rings around a point near the centre.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ARTIFACTS = ("clean", "ghosting", "noise", "bias", "ring")
VERSION = 2


def ghosting(img: np.ndarray, rng: np.random.Generator, period: int | None = None, phase: float | None = None,
             axis: int | None = None) -> np.ndarray:
    """Motion ghosting: phase error on every `period`-th k-space line along `axis`."""
    period = int(rng.integers(2, 5)) if period is None else period
    phase = float(rng.uniform(0.8, 1.6)) if phase is None else phase
    axis = int(rng.integers(0, 2)) if axis is None else axis
    k = np.fft.fft2(img)  # [H, W] complex
    lines = np.arange(img.shape[axis]) % period == 1
    factor = np.where(lines, np.exp(1j * phase), 1.0)
    k = k * (factor[:, None] if axis == 0 else factor[None, :])
    return np.clip(np.abs(np.fft.ifft2(k)), 0.0, 1.0).astype(np.float32)


def noise(img: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    """Rician noise of std `sigma` per channel."""
    sigma = float(rng.uniform(0.08, 0.15)) if sigma is None else sigma
    re = img + rng.normal(0, sigma, img.shape)
    im = rng.normal(0, sigma, img.shape)
    return np.clip(np.sqrt(re**2 + im**2), 0.0, 1.0).astype(np.float32)


def bias(img: np.ndarray, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    """Smooth multiplicative bias field exp(strength * p(u, v)), p a random quadratic in [-1, 1]."""
    strength = float(rng.uniform(0.6, 1.0)) if strength is None else strength
    h, w = img.shape
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")  # [H, W]
    c = rng.normal(size=6)
    p = c[0] * u + c[1] * v + c[2] * u * v + c[3] * u**2 + c[4] * v**2 + 0.2 * c[5]
    p = p / (np.abs(p).max() + 1e-8)
    return np.clip(img * np.exp(strength * p), 0.0, 1.0).astype(np.float32)


def ring(img: np.ndarray, rng: np.random.Generator, n_rings: int | None = None,
         amplitude: float | None = None) -> np.ndarray:
    """Concentric rings (alternating sign) of Gaussian profile around a point near the centre."""
    n_rings = int(rng.integers(4, 9)) if n_rings is None else n_rings
    amplitude = float(rng.uniform(0.15, 0.25)) if amplitude is None else amplitude
    h, w = img.shape
    cy, cx = h / 2 + rng.uniform(-0.1, 0.1) * h, w / 2 + rng.uniform(-0.1, 0.1) * w
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - cy, xx - cx)  # [H, W]
    out = img.astype(np.float64).copy()
    for i, radius in enumerate(rng.uniform(2, 0.45 * min(h, w), n_rings)):
        sign = 1.0 if i % 2 == 0 else -1.0
        out += sign * amplitude * np.exp(-((r - radius) ** 2) / (2 * 0.8**2))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


_FUNCS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "ghosting": ghosting, "noise": noise, "bias": bias, "ring": ring}


def apply_artifact(img: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Apply artifact `name` (or return a copy for "clean") with a seeded random severity.

    Example:
        >>> apply_artifact(np.zeros((8, 8), np.float32), "clean", 0).shape
        (8, 8)
    """
    if name not in ARTIFACTS:
        raise ValueError(f"unknown artifact {name!r}; choose from {ARTIFACTS}")
    if img.ndim != 2:
        raise ValueError(f"artifacts take a 2-D image, got shape {img.shape}")
    if name == "clean":
        return img.astype(np.float32, copy=True)
    return _FUNCS[name](img, np.random.default_rng(seed))
