"""Patch quality control: cheap per-patch measures of glass, marker ink, folds and defocus.

Measured on a patch at the model's input resolution (uint8 RGB, H x W x 3, 336 px for a 672 px
crop at 0.25 mpp, i.e. about 0.5 um per pixel), or on a batch (N x H x W x 3). Every measure is
integer arithmetic on the pixels (per-pixel classes, counts, sums) with one correctly rounded
float64 division at the end, so the same pixels give the same bits on every CPU.

Per-pixel classes (max, min = the brightest and darkest channel, chroma = max - min, all 0..255):

* glass: min >= GLASS_MIN_VALUE and chroma <= GLASS_MAX_CHROMA: bright and unsaturated (the same
  cue as the slide-level glass in `pathgen.wsi.tissue`, with fixed thresholds). H&E stain, even
  pale, absorbs green enough to exceed the chroma bound; empty fat cells are glass-like too.
* pen (coloured marker): chroma >= PEN_MIN_CHROMA and PEN_HUE_SLOPE (G - R) >= chroma, which is
  exactly hue in [63.75 deg, 236.25 deg] (60 + 60/16 to 240 - 60/16): yellow-green through green and
  cyan to blue. H&E lives in the other half of the hue circle: haematoxylin is blue-purple (hue
  ~248-258 deg in the demo's Beer-Lambert model; real scans 240-290), eosin pink-red (300-360 and
  0-20 deg), and both absorb green more than red, so stained tissue has R > G (in the model
  (R - G) >= 0.119 chroma, hue >= 247 deg, at every stain mix) and fails the test; mixes stay
  between the two (247-360 deg). Green markers (hue ~90-170 deg) and blue ones (~200-235 deg, over
  dark nuclei too) pass it. A scanner that renders haematoxylin bluer than 236 deg would need a
  larger PEN_HUE_SLOPE (a narrower range).
* pen (black marker): max <= BLACK_MAX_VALUE and chroma <= BLACK_MAX_CHROMA: very dark and grey.
* dark (fold, dense debris): max <= DARK_MAX_VALUE and chroma > BLACK_MAX_CHROMA: every channel
  dark yet coloured: overlapping layers of stained tissue. The darkest nuclear chromatin reaches it
  in a few pixels; a fold covers a band.

Per-patch measures (`measure`, MEASURES):

* background_fraction: the share of the patch's GLASS_BLOCK x GLASS_BLOCK blocks that are glass
  (>= GLASS_BLOCK_SHARE of their pixels) with only glass blocks within OPEN_GLASS_BLOCKS blocks
  (48 px, ~24 um): glass away from any tissue. The plain glass pixel share counts the empty fat
  cells of adipose tissue as glass (0.74-0.95 on synthetic adipose, as much as a patch at the
  section's edge); open glass does not (<= 0.05 there), while a patch with 20 % tissue still has
  >= 0.58 of it. Blocks, so a dust speck or a JPEG ringing pixel does not break up the glass.
* glass_fraction: the plain share of glass pixels (reported, not checked).
* pen_fraction, dark_fraction: the share of pen and of dark pixels.
* laplacian_variance: the classical focus measure (variance of the Laplacian of the grey image,
  Pertuz et al. 2013's LAPV; HistoQC's BlurDetectionModule uses it locally, and
  `cv2.Laplacian(grey).var()` is the common recipe): integer luma (ITU-R 601, 299 R + 587 G + 114 B over 1000, as
  PIL's "L"), the 4-neighbour integer Laplacian, and its variance over the pixels whose 3 x 3
  neighbourhood holds no glass (tissue only: glass is flat at any focus, and a half-glass patch
  would otherwise look blurred; with fewer than MIN_TISSUE_PIXELS such pixels, over the whole
  patch). Low: out of focus.

`qc_reasons(measures, thresholds)` gives each patch the first failing check in a fixed order:
background, pen, fold, blur (or None). THRESHOLDS holds the defaults (params.yaml `select.qc`).

Known-answer figures, `python bench/quality.py` (defaults: 120 patches per class and seed 0; demo-renderer
tissue of six textures, JPEG q85 decoded at half scale as the tile reader does) at THRESHOLDS:

* clear artefacts (glass with 0-20 % tissue; green / blue / black strokes covering >= 8 %; fold
  bands covering >= 10 %; defocus of Gaussian sigma 1.4-3.1 px at 336 px): recall 1.000 and
  precision 1.000 for every reason, clean tissue kept 120 / 120. Margins: open glass 0.586 (least
  of the glass patches) against 0.099 (most of any other); pen 0.090 against 0.000; dark 0.162
  against 0.018; Laplacian variance 290 (least of clean tissue: stroma) against 136 (most of the
  defocused: lymphocytes at sigma 1.4).
* mild artefacts, around the thresholds (20-50 % tissue, strokes 1-8 %, folds 3-10 %, sigma 0.6-1.0
  px): recall background 0.425 (0.93 under 30 % tissue, 0 above 40 %), pen 0.458 (1.00 above 6 %
  cover, 0 under 4 %), fold 0.042 (under its 10 % threshold by construction), blur 0.417 (0.71 at
  sigma 1.0, 0.19 at 0.6); precision 1.000 but blur 0.943 (3 mostly-glass patches called blur);
  clean tissue kept 120 / 120.
* cost: 3.4-4.4 ms per 336 px patch (best of 3 passes, batches of 64, one thread, a busy 2-core
  x86-64).
* demo slides (the tile step's tissue patches, read as the embed reader does): every patch with
  >= 10 % of the marker stroke is flagged pen (scale 1.0: 16 lung + 21 colon; 0.35: 7 + 7), every
  patch wholly in the out-of-focus block blur (9; 0.35: 4), and no other patch is flagged.

The thresholds are calibrated on the synthetic set only; the Laplacian variance depends on the
scanner, stain and JPEG quality of a cohort, so check min_laplacian_variance on its patches (the
benchmark's per-class ranges show the margins to look at) before trusting it.
tests/test_quality.py asserts floors (recall and precision >= 0.9 per reason) on a smaller set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

GLASS_MIN_VALUE = 200
GLASS_MAX_CHROMA = 24
PEN_MIN_CHROMA = 32
PEN_HUE_SLOPE = 16  # coloured pen: PEN_HUE_SLOPE (G - R) >= chroma, hue 60 + 60/k .. 240 - 60/k degrees
BLACK_MAX_VALUE = 64
BLACK_MAX_CHROMA = 30
DARK_MAX_VALUE = 100
MIN_TISSUE_PIXELS = 1024  # pixels of tissue a tissue-only focus measure needs (1 % of 336 x 336)
GLASS_BLOCK = 8  # px: glass is judged on blocks of GLASS_BLOCK x GLASS_BLOCK pixels
GLASS_BLOCK_SHARE = 0.9  # a block is glass when at least this share of its pixels is
OPEN_GLASS_BLOCKS = 6  # open glass: glass blocks with only glass blocks within this many blocks (48 px, 24 um)

REASONS = ("background", "pen", "fold", "blur")  # the order qc_reasons checks them in
QC_PREFIX = "qc:"  # a selection row's drop_reason for a patch that failed a check, e.g. "qc:pen"
MEASURES = ("background_fraction", "glass_fraction", "pen_fraction", "dark_fraction", "laplacian_variance")

# Defaults for params.yaml select.qc (see the module docstring for the known-answer figures).
THRESHOLDS: dict[str, Any] = {
    "enabled": True,
    "max_background_fraction": 0.5,
    "max_pen_fraction": 0.05,
    "max_dark_fraction": 0.10,
    "min_laplacian_variance": 150.0,
}

_LUMA = np.array([299, 587, 114], dtype=np.int32)


def _as_batch(patches: np.ndarray) -> tuple[np.ndarray, bool]:
    a = np.asarray(patches)
    if a.dtype != np.uint8:
        raise ValueError(f"patches must be uint8 RGB, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 3:
        return a[None], True
    if a.ndim == 4 and a.shape[-1] == 3:
        return a, False
    raise ValueError(f"patches must be H x W x 3 or N x H x W x 3, got shape {a.shape}")


def pixel_classes(patches: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean maps (same leading shape as `patches`, without the channel axis): glass, pen, dark.

    All in uint8: PEN_HUE_SLOPE (G - R) >= chroma is tested as G > R and G - R >= ceil(chroma /
    PEN_HUE_SLOPE), the same integers without a wider type (this runs on every patch a reader reads).
    """
    a = np.asarray(patches)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    chroma = mx - mn  # uint8: mx >= mn
    glass = (mn >= GLASS_MIN_VALUE) & (chroma <= GLASS_MAX_CHROMA)
    need = chroma // PEN_HUE_SLOPE + (chroma % PEN_HUE_SLOPE != 0)  # ceil(chroma / PEN_HUE_SLOPE), uint8
    coloured_pen = (chroma >= PEN_MIN_CHROMA) & (g > r) & (g - r >= need)
    black = (mx <= BLACK_MAX_VALUE) & (chroma <= BLACK_MAX_CHROMA)
    dark = (mx <= DARK_MAX_VALUE) & (chroma > BLACK_MAX_CHROMA) & ~coloured_pen
    return {"glass": glass, "pen": coloured_pen | black, "dark": dark}


def open_glass(glass: np.ndarray, radius: int = OPEN_GLASS_BLOCKS) -> np.ndarray:
    """Per patch of a boolean (N, H, W) glass map: the fraction of its GLASS_BLOCK blocks that are glass and
    have only glass blocks within `radius` blocks (a square), i.e. glass far from any tissue.

    Blocks (not pixels) so a speck of dust or a JPEG ringing pixel does not punch a hole in the glass
    and a thin membrane still counts as tissue; H and W are cropped to whole blocks.
    """
    n, h, w = glass.shape
    bh, bw = h // GLASS_BLOCK, w // GLASS_BLOCK
    if bh == 0 or bw == 0:
        return glass.reshape(n, -1).mean(axis=1) if h * w else np.zeros(n)
    counts = glass[:, : bh * GLASS_BLOCK, : bw * GLASS_BLOCK].reshape(n, bh, GLASS_BLOCK, bw, GLASS_BLOCK).sum(axis=(2, 4))
    blocks = counts * 10 >= round(GLASS_BLOCK_SHARE * 10) * GLASS_BLOCK * GLASS_BLOCK
    far = ndimage.minimum_filter(blocks, size=(1, 2 * radius + 1, 2 * radius + 1), mode="nearest")
    return far.sum(axis=(1, 2)) / (bh * bw)


def luma(patches: np.ndarray) -> np.ndarray:
    """Integer grey level (ITU-R 601 luma, rounded; PIL's "L") of uint8 RGB, as int32."""
    a = np.asarray(patches)
    y = a[..., 0].astype(np.int32)
    y *= int(_LUMA[0])
    for c in (1, 2):
        y += a[..., c].astype(np.int32) * int(_LUMA[c])
    y += 500
    y //= 1000
    return y


def measure(patches: np.ndarray) -> dict[str, np.ndarray | float]:
    """The QC measures (MEASURES) of one patch (floats) or a batch (float64 arrays of length N)."""
    batch, single = _as_batch(patches)
    n, h, w, _ = batch.shape
    classes = pixel_classes(batch)
    total = h * w
    out: dict[str, Any] = {
        "background_fraction": open_glass(classes["glass"]),
        "glass_fraction": classes["glass"].sum(axis=(1, 2)) / total,
        "pen_fraction": classes["pen"].sum(axis=(1, 2)) / total,
        "dark_fraction": classes["dark"].sum(axis=(1, 2)) / total,
    }
    grey = luma(batch)
    # the 4-neighbour Laplacian of the interior pixels, by slices (int32, |lap| <= 1020)
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
    lap += grey[:, 1:-1, :-2]
    lap += grey[:, 1:-1, 2:]
    lap -= 4 * grey[:, 1:-1, 1:-1]
    # tissue only: interior pixels with no glass in their 3 x 3 neighbourhood (rows, then columns)
    glass = classes["glass"]
    rows = glass[:, :-2] | glass[:, 1:-1] | glass[:, 2:]
    near_glass = rows[:, :, :-2] | rows[:, :, 1:-1] | rows[:, :, 2:]
    keep = ~near_glass
    counts = keep.sum(axis=(1, 2))
    few = counts < MIN_TISSUE_PIXELS
    keep[few] = True
    counts = keep.sum(axis=(1, 2)).astype(np.int64)
    lap = np.where(keep, lap, 0)
    s1 = lap.sum(axis=(1, 2), dtype=np.int64)
    lap *= lap  # <= 1020**2: fits int32
    s2 = lap.sum(axis=(1, 2), dtype=np.int64)
    # variance = (n S2 - S1^2) / n^2 with exact integers (Python ints: no overflow), one division
    out["laplacian_variance"] = np.array(
        [float(int(c) * int(q) - int(p) * int(p)) / float(int(c) * int(c)) for c, p, q in zip(counts, s1, s2)], np.float64
    )
    if single:
        return {k: float(v[0]) for k, v in out.items()}
    return out


def qc_reasons(measures: Mapping[str, Any], thresholds: Mapping[str, Any] | None = None) -> list[str | None] | str | None:
    """The first failing check per patch, in REASONS order, or None where it passes (a list for a batch).

    `thresholds` as THRESHOLDS (missing keys take the defaults); `enabled: false` passes every patch,
    and a threshold of None switches its check off.
    """
    t = {**THRESHOLDS, **(thresholds or {})}
    single = np.ndim(measures["background_fraction"]) == 0
    m = {k: np.atleast_1d(np.asarray(measures[k], np.float64)) for k in MEASURES}
    n = len(m["background_fraction"])
    reasons: list[str | None] = [None] * n
    if t["enabled"]:
        checks = (
            ("background", m["background_fraction"], t["max_background_fraction"], "max"),
            ("pen", m["pen_fraction"], t["max_pen_fraction"], "max"),
            ("fold", m["dark_fraction"], t["max_dark_fraction"], "max"),
            ("blur", m["laplacian_variance"], t["min_laplacian_variance"], "min"),
        )
        for name, values, limit, kind in checks:
            if limit is None:
                continue
            fail = values > limit if kind == "max" else values < limit
            for i in np.flatnonzero(fail).tolist():
                if reasons[i] is None:
                    reasons[i] = name
    return reasons[0] if single else reasons
