"""PSNR and SSIM as the super-resolution literature reports them (the BasicSR protocol that
StableSR, OSEDiff and PiSA-SR tables use): 8-bit pictures, ``scale`` pixels cropped from every
border, on the Y channel of ITU-R BT.601 YCbCr (Y in [16, 235]) or on RGB, in float64; SSIM is
Wang et al.'s, an 11x11 Gaussian window of σ = 1.5 over the valid region, C1 = (0.01·255)²,
C2 = (0.03·255)², averaged over channels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def y_channel(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB → HxWx1 float64 luma, BT.601 studio range (16-235)."""
    rgb = image.astype(np.float64) / 255.0
    return (rgb @ np.array([65.481, 128.553, 24.966]) + 16.0)[..., None]


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y: bool) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"sr metrics: need two uint8 pictures of one shape, got {a.shape} {a.dtype} "
                         f"and {b.shape} {b.dtype}")
    a, b = (y_channel(a), y_channel(b)) if y else (a.astype(np.float64), b.astype(np.float64))
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y: bool = True) -> float:
    """PSNR in dB of two HxWx3 uint8 pictures (inf when equal)."""
    a, b = _prepare(a, b, crop_border, y)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _window() -> np.ndarray:
    g = np.exp(-0.5 * (np.arange(11) - 5.0) ** 2 / 1.5**2)
    g /= g.sum()
    return np.outer(g, g)


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = _window()

    def filt(x):  # the valid region only: the 5-pixel margin a full window cannot cover is dropped
        return ndimage.correlate(x, w, mode="constant")[5:-5, 5:-5]

    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y: bool = True) -> float:
    """SSIM of two HxWx3 uint8 pictures (mean over channels; Y alone with ``y``)."""
    a, b = _prepare(a, b, crop_border, y)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))
