"""Synthetic screening mammograms with COCO lesion boxes: the images of the mammography demo set.

:func:`generate` writes the images and COCO files of every split; :mod:`data_tools.demo_mammo` makes the
whole demo set with it (``python -m data_tools.make_demo mammo``).

A small domain-adaptation benchmark. ``train`` is labelled "vendor A"; ``val``, ``test`` and the
unlabelled ``target`` split are "vendor B", as DDSM -> INBreast.

Anatomy (both vendors): a compressed breast (half-ellipse against the chest wall, left or right view,
pectoral muscle, thickness fall-off and skin line) whose fibroglandular tissue is a sigmoid of a
central envelope, the breast density and filtered noise, with ductal streaks radiating from the
nipple. Images are built in an attenuation-like domain (fat ~0.2, dense tissue ~0.6) and then
"acquired" by a vendor.

Lesions (one COCO category, ``lesion``; ``lesion_type`` is ``mass_round`` (circumscribed, obscured or
indistinct margin), ``mass_spiculated`` or ``calcifications`` (a faint cluster of sub-pixel specks);
``in_dense`` is True when the lesion centre lies in dense tissue, smoothed gland fraction >= 0.5).
Sizes are those of screening findings (masses 5-14 mm, clusters 4-12 mm at ~0.75 mm per pixel at 320
rows; sizes scale with the image). Lesions are placed preferentially in fibroglandular tissue (where
cancers arise), and a mass displaces tissue of nearly its own attenuation, so a mass in dense tissue
has about half the contrast of one in fat and sits in stronger texture and noise: such lesions are hard
to see. ``--lesion-contrast`` multiplies every lesion amplitude.

Distractors, never annotated, on normal and abnormal images alike (Poisson, mean ``--distractors``):
vessels (thin curvilinear lines), intramammary lymph nodes (small oval blobs with a fatty hilum notch),
benign calcifications (isolated larger round dots, some eggshell) and vascular calcifications
(dashed tram-track lines along a vessel). Each image entry lists them (``distractors``: kind + box) for
false-positive analyses; ``density`` (0..1) is the breast density the image was drawn with.

Vendor shift (all of it scaled by ``--shift``; 0 = vendor B renders exactly as vendor A, 1 = the
designed vendor B, up to 2 extrapolates): vendor A has a gamma-like transfer curve with a fixed
window, white quantum noise, a sharp detector and mild small-radius sharpening. Vendor B has a
sigmoid (DICOM VOI LUT SIGMOID-like) curve with a per-image histogram window, more and spatially
correlated noise, a blurrier detector with stronger, wider sharpening, a large-scale local contrast
enhancement ("processed for presentation", which also equalises the periphery), and a population of
smaller and denser breasts.

Calibration: ``calib`` (``--calib N``, default 0 = not written) holds labelled vendor-B images drawn from a
random stream of their own (split index 4, so adding it changes no other split's images). Generator knobs
(lesion contrast and size, distractors, shift) are tuned on it, never on ``test``.

Oracle: ``instances_target_truth.json`` is the ground truth of the target split (images/target, same
ids and file names as ``instances_target.json``). Adaptation never reads it; it serves diagnostics
(pseudo-label precision/recall on the target split) and doubles as the training set of the oracle
row: the same detector trained on the target split with its labels (vendor-B labels, evaluated on
``val`` / ``test`` like every other row). (``coco_tools validate`` pairs ``instances_<split>.json`` with
``images/<split>/`` and so reports a missing ``images/target_truth/`` for it.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

SPLITS = ("train", "val", "test", "target", "calib")  # appended splits keep the earlier splits' images
LESION_TYPES = ("mass_round", "mass_spiculated", "calcifications")
LESION_P = (0.4, 0.25, 0.35)  # share of each lesion type
DISTRACTOR_TYPES = ("vessel", "lymph_node", "benign_calcification", "vascular_calcification")
DISTRACTOR_P = (0.45, 0.2, 0.25, 0.1)
# Defaults chosen on the demo config (192 px, 6 source_only epochs from scratch; benchmarks/configs/
# medmask.yaml, seed 0): source_only R@0.3 0.52 on the vendor-B test split, the oracle (vendor-B labels) 0.79.
# At lesion contrast 1 and size 1 (screening-like) neither learns anything in that budget (R@0.3 ~0).
# Those figures were read on the TEST split, which makes them a choice seen on test: re-calibrate any knob on
# the calibration split instead (``--calib N``: labelled vendor-B images of their own random stream, never
# scored by the ablation; ``python benchmarks/medmask_ablation.py --split calib`` scores the rows on it).
DEFAULT_CONTRAST, DEFAULT_SIZE, DEFAULT_DISTRACTORS = 3.0, 2.0, 2.0
MAX_SHIFT = 2.0


# ---------------------------------------------------------------------------------- vendors
@dataclass(frozen=True)
class Look:
    """Acquisition and population parameters of a vendor (lengths in pixels at 320 x 256)."""

    blur: float            # detector blur, Gaussian sigma
    sharpen: float         # unsharp-mask amount ...
    sharpen_radius: float  # ... and its Gaussian sigma
    lce: float             # large-scale local contrast enhancement amount ("processed for presentation")
    noise: float           # quantum noise std at zero attenuation (grows with attenuation)
    noise_corr: float      # share of spatially correlated noise, 0 = white
    curve: float           # transfer curve: 0 = gamma + fixed window (A), 1 = sigmoid + image window (B)
    density_pow: float     # breast density = 0.1 + 0.8 * u ** density_pow, u uniform (< 1: denser)
    size: float            # breast size factor


VENDOR_A = Look(blur=0.5, sharpen=0.35, sharpen_radius=1.0, lce=0.0, noise=0.006, noise_corr=0.0, curve=0.0,
                density_pow=1.0, size=1.0)
VENDOR_B = Look(blur=0.9, sharpen=0.7, sharpen_radius=2.0, lce=0.6, noise=0.009, noise_corr=0.85, curve=1.0,
                density_pow=0.55, size=0.88)
_LOOK_LIMITS = {"noise_corr": (0.0, 1.0), "curve": (0.0, 1.0), "density_pow": (0.3, 1.0), "size": (0.75, 1.0)}


def vendor_look(vendor_b: bool, shift: float) -> Look:
    """Vendor A, or vendor B at domain gap ``shift`` (A + shift * (B - A), clipped; shift 0 gives A exactly)."""
    s = float(shift) if vendor_b else 0.0
    vals = {}
    for f in fields(Look):
        a, b = getattr(VENDOR_A, f.name), getattr(VENDOR_B, f.name)
        lo, hi = _LOOK_LIMITS.get(f.name, (0.0, np.inf))
        vals[f.name] = float(np.clip(a + s * (b - a), lo, hi))
    return Look(**vals)


# ---------------------------------------------------------------------------------- rendering
def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (smooth noise drawn at low resolution)."""
    f = max(1, int(sigma // 2))  # filter at 1/f resolution, then upsample: same look, much faster
    small = (-(-shape[0] // f), -(-shape[1] // f))
    n = ndimage.gaussian_filter(rng.standard_normal(small), sigma / f, mode="wrap")
    if f > 1:
        n = _upsample(n, f, shape)
    return n / (n.std() + 1e-8)


def _upsample(a: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling by ``f`` through PIL (much faster than ndimage.zoom), cropped to ``shape``."""
    from PIL import Image

    big = Image.fromarray(a.astype(np.float32)).resize((a.shape[1] * f, a.shape[0] * f), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.float64)[: shape[0], : shape[1]]


def _lowpass(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Mean of ``x`` over the breast within ~sigma pixels (normalised convolution at 1/4 resolution)."""
    f = 4
    h, w = x.shape
    hs, ws = -(-h // f), -(-w // f)
    xm = np.zeros((hs * f, ws * f))
    xm[:h, :w] = x * mask
    mm = np.zeros((hs * f, ws * f))
    mm[:h, :w] = mask
    xs = xm.reshape(hs, f, ws, f).mean((1, 3))  # [H/4, W/4]
    ms = mm.reshape(hs, f, ws, f).mean((1, 3))
    low = ndimage.gaussian_filter(xs, sigma / f) / np.maximum(ndimage.gaussian_filter(ms, sigma / f), 1e-3)
    return _upsample(low, f, (h, w))


def _anatomy(rng: np.random.Generator, h: int, w: int, left: bool, look: Look, scale: float) -> dict[str, Any]:
    """The breast before lesions: attenuation image ``att`` (fat ~0.2, dense ~0.6), masks, gland fraction."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [H, W] each
    xw = 0.0 if left else w - 1.0  # chest wall
    u_size, u_dens = rng.uniform(size=2)
    a = w * (0.62 + 0.25 * u_size) * look.size  # semi-axes: depth from the chest wall, height
    b = h * (0.36 + 0.10 * u_size) * look.size
    cy = h * rng.uniform(0.46, 0.56)
    density = 0.1 + 0.8 * u_dens ** look.density_pow  # fatty .. extremely dense
    dxn, dyn = np.abs(xx - xw) / a, (yy - cy) / b  # [H, W] 0 at the chest wall, 1 at the nipple
    r = np.sqrt(dxn**2 + dyn**2) * (1 + 0.025 * _noise(rng, (h, w), 25 * scale))  # 1 on the skin line
    mask = r <= 1.0
    # fibroglandular tissue: central envelope + density + texture (isotropic, and streaks towards the nipple)
    yn, xn = cy + 0.05 * b, xw + (a if left else -a)
    rho = np.hypot(yy - yn, xx - xn)
    theta = np.arctan2(yy - yn, (xx - xn) * (-1 if left else 1))  # 0 towards the chest wall
    n_rho, n_theta = 48, 160
    polar = ndimage.gaussian_filter(rng.standard_normal((n_rho, n_theta)), (2.5, 0.8), mode=("nearest", "wrap"))
    polar /= polar.std() + 1e-8
    coords = np.stack([rho / np.hypot(h, w) * (n_rho - 1), (theta + np.pi) / (2 * np.pi) * n_theta])
    streaks = ndimage.map_coordinates(polar, coords, order=1, mode="grid-wrap")  # [H, W]
    streaks *= np.clip((rho - 0.15 * a) / (0.45 * a), 0, 1)  # no sunburst at the nipple
    coarse, mid, fine = (_noise(rng, (h, w), s * scale) for s in (12.0, 4.0, 1.0))
    envelope = np.exp(-((dxn - 0.45) / 0.38) ** 2 - ((dyn + 0.15) / 0.6) ** 2)
    logit = 3.0 * (envelope - 0.5) + 4.5 * (density - 0.65) + 1.0 * coarse + 0.5 * streaks + 0.5 * mid
    gland = 1 / (1 + np.exp(-logit)) * np.clip((1 - r) / 0.1, 0, 1)  # [H, W] subcutaneous fat at the skin
    thick = np.sqrt(np.clip((1 - r) / 0.15, 0, 1))  # compressed breast: thinner towards the skin
    skin = np.exp(-(((1 - r) * min(a, b)) / (1.2 * scale)) ** 2)
    att = thick * (0.2 + 0.4 * gland + 0.025 * fine * gland) + 0.06 * skin
    # pectoral muscle: bright triangle in the upper chest-wall corner (MLO view)
    dx = xx if left else (w - 1 - xx)
    mw, mh = w * rng.uniform(0.2, 0.35), h * rng.uniform(0.3, 0.5)
    muscle = (dx / mw + yy / mh) <= 1.0
    att = np.where(muscle & mask, thick * (0.66 + 0.03 * mid), att)
    allowed = mask & ~ndimage.binary_dilation(muscle, iterations=max(1, round(6 * scale))) & (r < 0.85)
    gland_s = ndimage.gaussian_filter(np.where(muscle, 1.0, gland), 2.5 * scale)  # tissue around a point
    return {"att": np.where(mask, att, 0.0), "mask": mask, "allowed": allowed, "gland": gland_s,
            "density": density, "upper": yy < cy}


def _patch(h: int, w: int, cy: float, cx: float, half: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Slices of the square patch of half-size ``half`` around (cy, cx) and its coordinates relative to it."""
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return slice(y0, y1), slice(x0, x1), yy - cy, xx - cx


def _box(sig: np.ndarray, sy: slice, sx: slice, frac: float = 0.12) -> list[float]:
    """Box xywh (image pixels) of where the patch signal ``sig`` exceeds ``frac`` of its peak."""
    ys, xs = np.nonzero(sig > frac * sig.max())
    x0, y0, x1, y1 = xs.min() + sx.start, ys.min() + sy.start, xs.max() + 1 + sx.start, ys.max() + 1 + sy.start
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _ellipsoid(dy: np.ndarray, dx: np.ndarray, r: float, ratio: float, theta: float,
               lobes: float = 0.0, phase: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chord length through an ellipsoid (1 at the centre): ``(profile, u, v)`` in its own axes."""
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    edge = 1 + lobes * np.sin(3 * np.arctan2(v, u) + phase)  # lobulated margin
    d = np.sqrt((u / r) ** 2 + (v / (r * ratio)) ** 2) / edge
    return np.sqrt(np.clip(1 - d**2, 0, None)), u, v


def _mass(rng: np.random.Generator, att: np.ndarray, gland: np.ndarray, cy: float, cx: float, spiculated: bool,
          contrast: float, scale: float) -> list[float]:
    """Add a round/oval or spiculated mass at (cy, cx) to ``att``; returns its box xywh (pixels)."""
    h, w = att.shape
    r = (rng.uniform(2.5, 5.0) if spiculated else rng.uniform(3.5, 9.0)) * max(scale, 0.4)
    ratio, theta = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
    lobes, phase, soft = rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.35)
    # a mass displaces tissue of nearly its own attenuation: half the contrast in dense tissue
    amp = contrast * rng.uniform(0.12, 0.2) * (1 - 0.5 * gland[int(cy), int(cx)])
    sy, sx, dy, dx = _patch(h, w, cy, cx, r * (3.6 if spiculated else 1.6) + 3)
    prof, _, _ = _ellipsoid(dy, dx, r, ratio, theta, lobes, phase)
    sig = ndimage.gaussian_filter(prof**0.5, soft * r)  # circumscribed (sharp) .. indistinct (soft) margin
    if spiculated:  # thin radiating, slightly curved lines, drawn together and blurred once
        lines = np.zeros_like(sig)
        for phi in rng.uniform(0, 2 * np.pi, int(rng.integers(8, 17))):
            length, bend = r * rng.uniform(2.0, 3.4), rng.normal(0, 0.3)
            t = np.linspace(0.6 * r, length, int(length * 3))
            ang = phi + bend * (t / length) ** 2
            iy = np.round(cy + t * np.sin(ang)).astype(int) - sy.start
            ix = np.round(cx + t * np.cos(ang)).astype(int) - sx.start
            ok = (iy >= 0) & (iy < sig.shape[0]) & (ix >= 0) & (ix < sig.shape[1])
            np.maximum.at(lines, (iy[ok], ix[ok]), 0.8 * (1 - t[ok] / length) + 0.2)
        sig = np.maximum(sig, ndimage.gaussian_filter(lines, 0.5) * 1.6)
    att[sy, sx] += amp * sig
    return _box(sig, sy, sx)


def _dots(shape: tuple[int, int], dy: np.ndarray, dx: np.ndarray, pts: np.ndarray, amps: np.ndarray,
          sigmas: np.ndarray) -> np.ndarray:
    """Sum of Gaussian dots at sub-pixel offsets ``pts`` [N, 2] from the patch origin used by dy/dx."""
    out = np.zeros(shape)
    for (py, px), a, s in zip(pts, amps, sigmas):
        out += a * np.exp(-((dy - py) ** 2 + (dx - px) ** 2) / (2 * s * s))
    return out


def _calcifications(rng: np.random.Generator, att: np.ndarray, cy: float, cx: float, contrast: float,
                    scale: float) -> list[float]:
    """Add a faint cluster of 4-12 sub-pixel micro-calcifications around (cy, cx); returns its box xywh."""
    h, w = att.shape
    n, spread = int(rng.integers(4, 13)), rng.uniform(1.5, 4.0) * max(scale, 0.4)
    pts = rng.normal(0, spread, (n, 2))  # [N, 2] offsets (y, x)
    amps = contrast * rng.uniform(0.06, 0.16, n)  # calcium: independent of the tissue around it
    sy, sx, dy, dx = _patch(h, w, cy, cx, 3 * spread + 4)
    sig = _dots(dy.shape, dy, dx, pts, amps, rng.uniform(0.45, 0.75, n) * max(1.0, scale))  # specks
    att[sy, sx] += sig
    ys, xs = pts[:, 0] + cy, pts[:, 1] + cx
    x0, y0 = max(0.0, np.floor(xs.min()) - 2), max(0.0, np.floor(ys.min()) - 2)
    x1, y1 = min(float(w), np.ceil(xs.max()) + 3), min(float(h), np.ceil(ys.max()) + 3)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _pick(rng: np.random.Generator, weight: np.ndarray, avoid: list[list[float]], margin: float
          ) -> tuple[float, float]:
    """A pixel (y, x) drawn with probability ~ ``weight``, away from the boxes ``avoid`` (xywh + margin)."""
    ys, xs = np.nonzero(weight > 0)
    cdf = np.cumsum(weight[ys, xs])
    for _ in range(20):
        j = min(int(np.searchsorted(cdf, rng.uniform(0, cdf[-1]), side="right")), len(ys) - 1)
        y, x = float(ys[j]), float(xs[j])
        if all(not (bx - margin <= x <= bx + bw + margin and by - margin <= y <= by + bh + margin)
               for bx, by, bw, bh in avoid):
            break
    return y, x


def _curve(rng: np.random.Generator, y: float, x: float, heading: float, length: float) -> np.ndarray:
    """Points [N, 2] (y, x), 0.5 px apart, of a smooth random curve from (y, x)."""
    n = max(2, int(length * 2))
    turn = ndimage.gaussian_filter1d(rng.normal(0, 0.08, n), 8, mode="nearest")  # smooth curvature
    ang = heading + np.cumsum(turn)
    return np.stack([y + np.cumsum(0.5 * np.sin(ang)), x + np.cumsum(0.5 * np.cos(ang))], 1)


def _distractors(rng: np.random.Generator, att: np.ndarray, anat: dict[str, Any], left: bool, mean: float,
                 avoid: list[list[float]], scale: float) -> list[dict[str, Any]]:
    """Add unannotated lesion look-alikes to ``att``; returns ``[{kind, bbox}]`` for diagnostics."""
    h, w = att.shape
    mask, gland = anat["mask"], anat["gland"]
    allowed = (anat["allowed"] if anat["allowed"].any() else mask).astype(float)
    lines = np.zeros_like(att)  # vessels and vascular calcifications, blurred once at the end
    found: list[dict[str, Any]] = []
    toward_nipple = 0.0 if left else np.pi
    for _ in range(int(rng.poisson(mean))):
        kind = DISTRACTOR_TYPES[int(rng.choice(len(DISTRACTOR_TYPES), p=DISTRACTOR_P))]
        if kind in ("vessel", "vascular_calcification"):
            y, x = _pick(rng, allowed, [], 0)
            length = (rng.uniform(40, 140) if kind == "vessel" else rng.uniform(20, 60)) * scale
            pts = _curve(rng, y, x, toward_nipple + rng.uniform(-1.0, 1.0) + np.pi * (rng.uniform() < 0.5), length)
            iy, ix = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
            ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            iy, ix = iy[ok], ix[ok]
            ok = mask[iy, ix]
            iy, ix = iy[ok], ix[ok]
            if len(iy) < 4:
                continue
            np.maximum.at(lines, (iy, ix), rng.uniform(0.06, 0.1))  # a vessel: a faint thin line
            if kind == "vascular_calcification":  # dashed bright walls either side of the vessel
                dash = (np.arange(len(iy)) // max(2, int(rng.integers(3, 8)))) % 2 == 0
                for off in (-1, 1):
                    jy, jx = np.clip(iy[dash] + off, 0, h - 1), ix[dash]
                    np.maximum.at(lines, (jy, jx), rng.uniform(0.1, 0.2))
            found.append({"kind": kind, "bbox": [float(ix.min()), float(iy.min()), float(ix.max() - ix.min() + 1),
                                                 float(iy.max() - iy.min() + 1)]})
        elif kind == "lymph_node":  # in fat, more often in the upper (axillary) part
            y, x = _pick(rng, allowed * (1.2 - gland) * np.where(anat["upper"], 2.0, 1.0), avoid, 6 * scale)
            r, ratio = rng.uniform(3.0, 6.0) * max(scale, 0.4), rng.uniform(0.6, 0.9)
            sy, sx, dy, dx = _patch(h, w, y, x, 1.6 * r + 2)
            prof, u, v = _ellipsoid(dy, dx, r, ratio, rng.uniform(0, np.pi))
            hilum = rng.uniform(0, 2 * np.pi)  # a fatty notch on one side of the node
            notch = np.exp(-((u - r * 0.75 * np.cos(hilum)) ** 2 + (v - r * ratio * 0.75 * np.sin(hilum)) ** 2)
                           / (2 * (0.35 * r) ** 2))
            sig = ndimage.gaussian_filter(prof**0.5 * np.clip(1 - 1.2 * notch, 0, 1), 0.6)
            att[sy, sx] += rng.uniform(0.1, 0.18) * sig
            found.append({"kind": kind, "bbox": _box(sig, sy, sx)})
        else:  # benign calcification: an isolated larger round dot, sometimes eggshell (lucent centre)
            y, x = _pick(rng, allowed, avoid, 6 * scale)
            r = rng.uniform(1.0, 2.2) * max(scale, 0.5)
            sy, sx, dy, dx = _patch(h, w, y, x, r + 3)
            d = np.hypot(dy, dx) / r
            sig = np.clip(1 - d**2, 0, None) ** 0.5
            if rng.uniform() < 0.3 and r >= 1.5:
                sig = sig * np.clip(d * 1.4, 0, 1)
            sig = ndimage.gaussian_filter(sig, 0.5)
            att[sy, sx] += rng.uniform(0.15, 0.35) * sig
            found.append({"kind": kind, "bbox": _box(sig, sy, sx)})
    att += ndimage.gaussian_filter(lines, 0.6 * max(scale, 0.5)) * mask
    return found


def _acquire(rng: np.random.Generator, att: np.ndarray, mask: np.ndarray, look: Look, scale: float) -> np.ndarray:
    """The vendor's detector, noise, processing and transfer curve: attenuation -> display values in [0, 1]."""
    h, w = att.shape
    x = ndimage.gaussian_filter(att, look.blur * scale)  # detector blur
    white = rng.standard_normal((h, w))
    corr = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.2 * max(scale, 0.5))
    corr /= corr.std() + 1e-8
    n = np.sqrt(1 - look.noise_corr) * white + np.sqrt(look.noise_corr) * corr  # unit std, white .. correlated
    x = x + look.noise * (1 + 1.5 * x) * n  # denser tissue: fewer photons, more noise
    if look.lce:  # local contrast enhancement: boosts detail, flattens thickness (the periphery)
        x = x + look.lce * (x - _lowpass(x, mask, 16 * scale)) * mask
    x = x + look.sharpen * (x - ndimage.gaussian_filter(x, look.sharpen_radius * scale))
    lo, hi = 0.1, 0.75  # vendor A: fixed window, gamma curve
    if look.curve:  # vendor B: the window of this image's histogram, sigmoid curve
        plo, phi = np.percentile(x[mask], [1.0, 99.5])
        lo, hi = lo + look.curve * (plo - lo), hi + look.curve * (phi - hi)
    xn = np.clip((x - lo) / max(hi - lo, 1e-3), 0, 1)
    y = xn**0.8
    if look.curve:
        s0, s1 = 1 / (1 + np.exp(0.5 / 0.22)), 1 / (1 + np.exp(-0.5 / 0.22))
        sig = (1 / (1 + np.exp(-(xn - 0.5) / 0.22)) - s0) / (s1 - s0)
        y = (1 - look.curve) * y + look.curve * sig
    return np.where(mask, np.clip(0.04 + 0.96 * y, 0.02, 1.0), 0.0)


def render(rng: np.random.Generator, h: int, w: int, abnormal: bool, vendor_b: bool, shift: float, *,
           lesion_contrast: float = 1.0, distractors: float = DEFAULT_DISTRACTORS, lesion_size: float = 1.0
           ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """One synthetic mammogram: ``(image [H, W] in [0, 1], lesions, meta)``.

    ``lesions``: ``[{bbox (xywh), lesion_type, in_dense}]``; ``meta``: ``{view, vendor, density,
    distractors: [{kind, bbox}]}``. Anatomy, lesions, distractors and noise draw from separate streams
    seeded by ``rng``: changing ``distractors`` or ``lesion_contrast`` leaves the anatomy, the other
    objects and the noise as they are (vendor B's per-image window follows the content), and
    ``vendor_b=True`` with ``shift=0`` gives exactly the image of ``vendor_b=False``.

    Example::

        img, lesions, meta = render(np.random.default_rng(0), 320, 256, True, True, 1.0)
    """
    look = vendor_look(vendor_b, shift)
    scale = float(np.sqrt(h * w / (320 * 256)))
    r_anat, r_les, r_dis, r_acq = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**62, 4))
    left = bool(r_anat.integers(2))
    anat = _anatomy(r_anat, h, w, left, look, scale)
    att, gland = anat["att"], anat["gland"]
    lesions: list[dict[str, Any]] = []
    if abnormal:
        where = ndimage.binary_erosion(anat["allowed"], iterations=max(1, round(10 * scale)))
        if not where.any():
            where = anat["allowed"] if anat["allowed"].any() else anat["mask"]
        weight = where * (0.6 + gland)  # lesions arise in fibroglandular tissue
        for _ in range(1 if r_les.uniform() < 0.75 else 2):
            cy, cx = _pick(r_les, weight, [les["bbox"] for les in lesions], 12 * scale)
            kind = LESION_TYPES[int(r_les.choice(len(LESION_TYPES), p=LESION_P))]
            in_dense = bool(gland[int(cy), int(cx)] >= 0.5)
            if kind == "calcifications":
                box = _calcifications(r_les, att, cy, cx, lesion_contrast, scale * lesion_size)
            else:
                box = _mass(r_les, att, gland, cy, cx, kind == "mass_spiculated", lesion_contrast,
                            scale * lesion_size)
            lesions.append({"bbox": box, "lesion_type": kind, "in_dense": in_dense})
    found = _distractors(r_dis, att, anat, left, distractors, [les["bbox"] for les in lesions], scale)
    out = _acquire(r_acq, att, anat["mask"], look, scale)
    meta = {"view": "L" if left else "R", "vendor": "B" if vendor_b else "A",
            "density": round(float(anat["density"]), 3), "distractors": found}
    return out, lesions, meta


# ------------------------------------------------------------------------------------- writing
def _write_png16(path: Path, img01: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(img01 * 65535).astype(np.uint16)).save(path, compress_level=1)


def generate(out: Path, *, seed: int, height: int, width: int, counts: dict[str, int], abnormal_frac: float,
             shift: float, lesion_contrast: float = 1.0, distractors: float = DEFAULT_DISTRACTORS,
             lesion_size: float = 1.0) -> dict[str, int]:
    """Write images and COCO files of all splits under ``out`` (= DATA_ROOT/demo); returns lesion counts.

    Besides ``instances_<split>.json`` it writes ``instances_target_truth.json``: the target split with
    its annotations (diagnostics and the oracle's training set; see the module docstring).
    """
    if height < 64 or width < 64:
        raise ValueError(f"--height/--width must be >= 64, got {height}x{width}")
    if not 0 <= abnormal_frac <= 1:
        raise ValueError(f"--abnormal-frac must be in [0, 1], got {abnormal_frac}")
    if not 0 <= shift <= MAX_SHIFT:
        raise ValueError(f"--shift must be in [0, {MAX_SHIFT}], got {shift}")
    if not lesion_contrast > 0:
        raise ValueError(f"--lesion-contrast must be > 0, got {lesion_contrast}")
    if not lesion_size > 0:
        raise ValueError(f"--lesion-size must be > 0, got {lesion_size}")
    if not distractors >= 0:
        raise ValueError(f"--distractors must be >= 0, got {distractors}")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    n_lesions = {}
    for s_idx, split in enumerate(SPLITS):
        if not counts.get(split, 0):  # an optional split (calib) not asked for: nothing written
            continue
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        n_abn = round(counts[split] * abnormal_frac)
        order = np.random.default_rng([seed, s_idx, 999]).permutation(counts[split])
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, s_idx, i])
            img, lesions, meta = render(rng, height, width, bool(order[i] < n_abn), split != "train", shift,
                                        lesion_contrast=lesion_contrast, distractors=distractors,
                                        lesion_size=lesion_size)
            image_id = (s_idx + 1) * 100000 + i
            name = f"{split}_{i:05d}.png"
            _write_png16(img_dir / name, img)
            images.append({"id": image_id, "file_name": name, "height": height, "width": width, **meta})
            for k, les in enumerate(lesions):
                x, y, bw, bh = les["bbox"]
                anns.append({"id": image_id * 10 + k + 1, "image_id": image_id, "category_id": 1,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                             "lesion_type": les["lesion_type"], "in_dense": les["in_dense"]})
        coco = {"info": {"description": f"medssl synthetic mammography demo, split {split}", "seed": seed},
                "images": images, "categories": [{"id": 1, "name": "lesion", "supercategory": "lesion"}]}
        if split == "target":  # unlabelled for training; its ground truth in a file of its own
            truth = {**coco, "annotations": anns,
                     "info": {"description": "medssl synthetic mammography demo, ground truth of the unlabelled "
                                             "split target (images/target): diagnostics and the oracle's "
                                             "training set, never read by adaptation", "seed": seed}}
            (out / "annotations" / "instances_target_truth.json").write_text(json.dumps(truth))
        else:
            coco["annotations"] = anns
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        n_lesions[split] = len(anns)
    return n_lesions
