"""Synthetic degradations for demo and test data (uint8 BGR in, uint8 BGR out, explicit RNG).

Simple physically motivated models, enough to give each source its own statistics; not a replacement
for the real training sets of the papers.
"""
from __future__ import annotations

import cv2
import numpy as np

DEGRADATIONS = ('noise', 'rain', 'haze', 'blur', 'lowlight')


def _as_float(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}')
    return img.astype(np.float32) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, rng: np.random.Generator | None = None, sigma: float = 25.0) -> np.ndarray:
    """uint8(clip(img + N(0, 1) * sigma, 0, 255)) on the uint8 image: the reference's clip-and-truncate.

    ``rng=None`` draws from NumPy's global generator (seeded per DataLoader worker by BasicSR).
    """
    if img.dtype != np.uint8:
        raise ValueError(f'gaussian_noise expects a uint8 image, got {img.dtype}.')
    noise = (rng if rng is not None else np.random).standard_normal(img.shape).astype(np.float32)
    noisy = img.astype(np.float32) + noise * sigma
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle_deg, 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    return k / max(k.sum(), 1e-6)


def rain_streaks(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bright slanted streaks: sparse drops smeared by a line kernel, added to the image (screen-like)."""
    x = _as_float(img)
    h, w = x.shape[:2]
    drops = (rng.random((h, w)) < rng.uniform(0.01, 0.03)).astype(np.float32) * rng.uniform(0.6, 1.0)
    streaks = cv2.filter2D(drops, -1, _line_kernel(int(rng.integers(9, 17)), float(rng.uniform(60, 120))))
    streaks = np.clip(streaks * rng.uniform(2.5, 4.0), 0, 1)[..., None]
    return _to_uint8(1 - (1 - x) * (1 - 0.8 * streaks))


def haze(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d), with a smooth synthetic depth d."""
    x = _as_float(img)
    h, w = x.shape[:2]
    ramp = np.linspace(1.0, 0.2, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)  # far at the top
    blobs = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigmaX=max(h, w) / 8)
    depth = np.clip(ramp + 0.5 * (blobs - blobs.mean()), 0, 1)
    t = np.exp(-rng.uniform(0.5, 1.1) * depth)[..., None]
    airlight = rng.uniform(0.7, 0.9)
    return _to_uint8(x * t + airlight * (1 - t))


def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Linear motion blur of random length and direction."""
    kernel = _line_kernel(int(rng.integers(7, 15)), float(rng.uniform(0, 180)))
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def low_light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Under-exposure: gamma darkening and gain, plus a little sensor noise."""
    x = _as_float(img)
    dark = np.power(x, rng.uniform(1.5, 2.5)) * rng.uniform(0.25, 0.45)
    dark = dark + rng.standard_normal(x.shape).astype(np.float32) * rng.uniform(0.005, 0.015)
    return _to_uint8(np.clip(dark, 0, 1))


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Apply one of :data:`DEGRADATIONS` to a uint8 BGR image."""
    functions = {'noise': gaussian_noise, 'rain': rain_streaks, 'haze': haze, 'blur': motion_blur,
                 'lowlight': low_light}
    if kind not in functions:
        raise ValueError(f'unknown degradation {kind!r}; choose from {DEGRADATIONS}')
    return functions[kind](img, rng)
