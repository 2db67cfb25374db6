"""Tissue segmentation on a low-resolution level (CLAM-style, with two cues).

CLAM thresholds HSV saturation with Otsu. On its own that silently drops pale,
weakly stained tissue whenever strongly stained tissue shares the slide: Otsu's
split then falls between the two tissue colours instead of between glass and
tissue. Here a pixel is tissue when either of two cues says so, each measured
against the slide's own glass:

1. Glass, estimated from the image itself: among the glass-like pixels
   (denoised saturation at most max(GLASS_MAX_SATURATION, `min_saturation`):
   glass and pale tissue, never H&E stain), the *brightest* luminance mode holding at least
   BACKGROUND_MIN_FRACTION of the image. Brightest, not largest, so a slide that
   is mostly tissue still finds its strip of glass (tissue only absorbs light;
   it is never brighter than its glass). The glass colour I0 is the per-channel
   median of the glass-like pixels within 3 noise sigmas of that mode. No such
   mode (no glass at all, or too little): I0 = white, the ideal background, so
   anything stained, or darker than 89 % of white in some channel (the default
   OD floor 0.05), is tissue.
2. Saturation cue: median-filtered (`blur_radius`) HSV saturation above
   max(`min_saturation`, glass median + NOISE_SIGMAS robust sigmas). This is
   stained tissue, however strong the stain is elsewhere on the slide.
3. Optical-density cue: median-filtered transmittance of the most absorbed
   channel, min_c I_c / I0_c, below 10**-t, i.e. OD = log10(I0 / I) above t
   in some channel, t = max(`min_optical_density`, NOISE_SIGMAS robust sigmas of
   the glass). This catches tissue that absorbs light without much colour
   (pale, greyish, faint stain). The map is uint8 (glass at
   TRANSMITTANCE_SCALE) and compared against a scalar: no per-pixel logarithm.
4. Union of the cues; then closing (`close_radius`), hole filling and removal
   of objects smaller than `min_object_px`, as before.

`otsu_threshold` stays for comparison (the CLAM cue); the mask no longer uses it.

All of it is integer histograms, medians and comparisons (float only in
correctly rounded division): deterministic, no randomness, the same bits on
every CPU. Its cost is two median filters where Otsu alone had one. The glass,
the thresholds and each cue's tissue fraction are logged at INFO.

Known limits: adipose tissue (empty fat cells, thin membranes the median
filter removes) looks like glass to both cues unless it is enclosed by tissue
(hole filling). An unscanned area read as white (OpenSlide's transparent
regions) is brighter than real glass; if it forms a mode it is taken as the
glass, and real glass darker than it by more than `min_optical_density` then
counts as tissue.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

# A luminance mode counts as glass when the pixels within MODE_HALF_WIDTH levels
# of it are at least this fraction of the image (not the paper's; CLAM has no such step).
BACKGROUND_MIN_FRACTION = 0.01
MODE_HALF_WIDTH = 8
# Glass, even tinted, stays under this HSV saturation (H&E stain is far above it);
# only pixels this unsaturated (or under min_saturation, if higher) may be glass.
GLASS_MAX_SATURATION = 40
# A cue's threshold is at least this many robust noise sigmas above the glass.
NOISE_SIGMAS = 6.0
TRANSMITTANCE_SCALE = 200  # the glass level of the uint8 transmittance map
_SMOOTH = np.array([1, 2, 3, 2, 1], dtype=np.int64)  # integer histogram smoothing


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


def _robust_sigma(deviations: np.ndarray) -> float:
    """1.4826 * median absolute deviation, at least one grey level (the quantisation step)."""
    if deviations.size == 0:
        return 1.0
    return max(1.0, 1.4826 * float(np.median(np.abs(deviations))))


def brightest_mode(values: np.ndarray, min_count: float) -> int | None:
    """The brightest local maximum of the (smoothed) histogram of uint8 `values` that
    has at least `min_count` values within MODE_HALF_WIDTH levels; None if none has."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.int64)
    smooth = np.convolve(hist, _SMOOTH, mode="same")
    mass = np.convolve(hist, np.ones(2 * MODE_HALF_WIDTH + 1, dtype=np.int64), mode="same")
    padded = np.concatenate(([-1], smooth, [-1]))
    peaks = (smooth > padded[:-2]) & (smooth >= padded[2:]) & (smooth > 0) & (mass >= min_count)
    found = np.flatnonzero(peaks)
    return int(found[-1]) if found.size else None


def estimate_background(rgb: np.ndarray, saturation: np.ndarray, min_saturation: int) -> dict[str, Any]:
    """The glass of a thumbnail: its colour and luminance, from `rgb` (as read) and `saturation` (denoised)."""
    luminance = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    low_cut = max(min_saturation, GLASS_MAX_SATURATION)
    low = saturation <= low_cut
    mode = brightest_mode(luminance[low], BACKGROUND_MIN_FRACTION * luminance.size)
    if mode is None:
        white = (255.0, 255.0, 255.0)
        return {"found": False, "low_saturation_cut": low_cut, "luminance": 255, "colour": white, "band": None}
    lum_low = luminance[low].astype(np.int64)
    sigma = _robust_sigma(lum_low[lum_low >= mode] - mode)
    band = low & (np.abs(luminance.astype(np.int64) - mode) <= max(2.0, 3.0 * sigma))
    colour = tuple(max(1.0, float(np.median(rgb[..., c][band]))) for c in range(3))
    return {"found": True, "low_saturation_cut": low_cut, "luminance": mode, "colour": colour, "band": band}


def transmittance_map(rgb: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """uint8 TRANSMITTANCE_SCALE * min over channels of pixel / glass: the glass near
    TRANSMITTANCE_SCALE, tissue lower (its most absorbed channel), fill white a little above."""
    ratio = rgb[..., 0].astype(np.float32) / np.float32(colour[0])
    for c in (1, 2):
        np.minimum(ratio, rgb[..., c].astype(np.float32) / np.float32(colour[c]), out=ratio)
    return np.clip(np.rint(ratio * np.float32(TRANSMITTANCE_SCALE)), 0, 255).astype(np.uint8)


def tissue_mask(image: Image.Image, params: dict[str, Any], min_object_px: float = 0.0) -> np.ndarray:
    """Boolean tissue mask of an RGB image (see the module docstring for the method).

    `params` is params.yaml's `tile.mask` section; objects smaller than
    `min_object_px` mask pixels are removed.
    """
    image = image.convert("RGB")
    rgb = np.asarray(image)
    size = 2 * params["blur_radius"] + 1

    def denoise(values: np.ndarray) -> np.ndarray:
        return ndimage.median_filter(values, size=size, mode="nearest") if params["blur_radius"] > 0 else values

    saturation = denoise(np.asarray(image.convert("HSV"))[..., 1])
    bg = estimate_background(rgb, saturation, params["min_saturation"])
    transmit = denoise(transmittance_map(rgb, bg["colour"]))

    # Each cue's threshold: its floor, or NOISE_SIGMAS robust sigmas of the (denoised) glass if that is higher.
    sat_floor = float(params["min_saturation"])
    od_floor = float(params["min_optical_density"])
    sat_threshold, od_threshold = sat_floor, od_floor
    if bg["band"] is not None:
        sat_bg = saturation[bg["band"]].astype(np.int64)
        sat_median = float(np.median(sat_bg))
        sat_threshold = max(sat_floor, sat_median + NOISE_SIGMAS * _robust_sigma(sat_bg - sat_median))
        tr_bg = transmit[bg["band"]].astype(np.int64)
        tr_median = float(np.median(tr_bg))
        tr_low = tr_median - NOISE_SIGMAS * _robust_sigma(tr_bg - tr_median)
        if 0 < tr_low < tr_median:
            od_threshold = max(od_floor, math.log10(tr_median / tr_low))
    by_saturation = saturation > sat_threshold
    by_density = transmit < TRANSMITTANCE_SCALE * 10.0**-od_threshold

    mask = by_saturation | by_density
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

    log.info(
        "tissue mask %dx%d: glass %s (luminance %d, RGB %s; saturation <= %d counted as glass-like); "
        "saturation > %.1f: %.2f%% of pixels; optical density > %.3f: %.2f%%; both: %.2f%%; mask after cleanup: %.2f%%",
        rgb.shape[1], rgb.shape[0], "found" if bg["found"] else "not found, assuming white",
        bg["luminance"], ",".join(f"{v:g}" for v in bg["colour"]), bg["low_saturation_cut"],
        sat_threshold, 100 * by_saturation.mean(), od_threshold, 100 * by_density.mean(),
        100 * (by_saturation & by_density).mean(), 100 * mask.mean(),
    )
    return mask


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels on the inner border of `mask`."""
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
