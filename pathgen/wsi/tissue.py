"""Tissue segmentation on a low-resolution level (CLAM-style).

Otsu threshold on HSV saturation, with a floor so that an empty slide (all
glass) segments to nothing instead of to its noise; then closing, hole filling
and removal of small objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 `values`: the level maximising between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = total - weight_low
    cum_mean = np.cumsum(hist * levels)
    mean_low = np.divide(cum_mean, weight_low, out=np.zeros(256), where=weight_low > 0)
    mean_high = np.divide(cum_mean[-1] - cum_mean, weight_high, out=np.zeros(256), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def tissue_mask(image: Image.Image, params: dict[str, Any], min_object_px: float = 0.0) -> np.ndarray:
    """Boolean tissue mask of an RGB image.

    `params` is params.yaml's `tile.mask` section; objects smaller than
    `min_object_px` mask pixels are removed.
    """
    saturation = np.asarray(image.convert("HSV"))[..., 1]
    if params["blur_radius"] > 0:
        saturation = ndimage.median_filter(saturation, size=2 * params["blur_radius"] + 1, mode="nearest")
    threshold = max(otsu_threshold(saturation), params["min_saturation"])
    mask = saturation > threshold
    if params["close_radius"] > 0 and mask.any():
        pad = params["close_radius"]
        padded = np.pad(mask, pad)
        padded = ndimage.binary_closing(padded, structure=_disk(pad))
        mask = padded[pad:-pad, pad:-pad]
    if params["fill_holes"]:
        mask = ndimage.binary_fill_holes(mask)
    if min_object_px > 0 and mask.any():
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_object_px
        keep[0] = False
        mask = keep[labels]
    return mask


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels on the inner border of `mask`."""
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
