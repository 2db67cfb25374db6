"""Planted slide artefacts (marker ink, defocus, tissue folds, glass) and a synthetic QC patch set.

Used by the demo slides (`pathgen.demo.slides`: a marker stroke and an out-of-focus region) and by
the quality-control tests and benchmark (`qc_patches`: labelled 336 px patches with a known
artefact). Per pixel, everything here is integer arithmetic or float64 add / multiply / divide /
compare (correctly rounded), so a pixel is a deterministic function of its inputs on every x86-64
CPU; the only transcendental values are constants (the fold layer's colour, rounded to 1/256 once)
and the random stroke angles of `qc_patches` (one cos / sin per test patch, not used by the demo):

* marker ink is a per-channel transmittance in 1/256 units (`INKS`), applied multiplicatively over
  what lies under it (ink sits on the coverslip or the section and absorbs what passes through),
  with an integer coverage alpha 0..256;
* defocus is an integer box blur repeated (`box_blur`: two passes of a (2r+1)-box approximate a
  Gaussian of sigma sqrt(2 r (r + 1) / 3)), computed with cumulative sums and rounded integer
  division;
* a tissue fold is the tissue seen through a second, dense layer: its pixels times the fold
  layer's transmittance (`FOLD_LAYER`, a Beer-Lambert colour of heavy haematoxylin and eosin);
* glass is the renderer's own background class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from pathgen.store.seeds import derive_seed, rng_for

# Marker ink transmittance per channel (R, G, B), in 1/256. Green and blue markers absorb red most;
# black absorbs everything. Chosen to look like scanned Sharpie-type markers over H&E.
INKS: dict[str, tuple[int, int, int]] = {
    "green": (64, 190, 120),
    "blue": (40, 110, 220),
    "black": (30, 30, 34),
}
# A fold's second layer: a Beer-Lambert colour of haematoxylin 1.5 and eosin 1.5 (the renderer's
# stain optical densities), rounded to 1/256 once.
_H_OD = (0.62, 0.76, 0.28)
_E_OD = (0.05, 1.0, 0.42)
FOLD_LAYER: tuple[int, int, int] = tuple(int(round(256 * math.exp(-(1.5 * h + 1.5 * e)))) for h, e in zip(_H_OD, _E_OD))


def apply_ink(rgb: np.ndarray, alpha: np.ndarray, transmittance: tuple[int, int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3) under ink of `transmittance` (1/256 per channel) with coverage `alpha` (H, W), 0..256.

    out = rgb * (256 - alpha * (256 - T) / 256) / 256, in integers, rounded.
    """
    a = np.asarray(alpha, np.int64)[..., None]
    t = np.asarray(transmittance, np.int64)
    factor = 256 * 256 - a * (256 - t)  # transmittance in 1/65536
    return ((rgb.astype(np.int64) * factor + 32768) >> 16).astype(np.uint8)


def segment_alpha(xs: np.ndarray, ys: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                  half_width: float, edge: float = 6.0) -> np.ndarray:
    """Integer coverage 0..256 of a stroke of `half_width` px along the segment p0-p1 (rounded caps) at the
    pixel grid ys x xs (level-0 pixel-centre coordinates), with a linear edge of about `edge` px.

    float64 with add, multiply, divide and compare only (no square root: the edge ramp is linear in the
    squared distance), so every pixel is exact.
    """
    x0, y0 = p0
    dx, dy = p1[0] - x0, p1[1] - y0
    len2 = dx * dx + dy * dy
    px = np.asarray(xs, np.float64)[None, :] - x0
    py = np.asarray(ys, np.float64)[:, None] - y0
    t = np.clip((px * dx + py * dy) / len2, 0.0, 1.0) if len2 > 0 else np.zeros(np.broadcast_shapes(px.shape, py.shape))
    ex, ey = px - t * dx, py - t * dy
    d2 = ex * ex + ey * ey
    r2 = half_width * half_width
    ramp = 2.0 * half_width * edge  # d2 spans about this across an edge of `edge` px
    alpha = np.clip((r2 - d2) / ramp * 256.0 + 128.0, 0.0, 256.0)
    return np.floor(alpha).astype(np.int64)


def _box_1d(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Integer (2r+1)-box mean along `axis` with edge replication, rounded half up."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.int64)
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    k = 2 * radius + 1
    return (hi - lo + k // 2) // k


def box_blur(rgb: np.ndarray, radius: int, passes: int = 2) -> np.ndarray:
    """Defocus: `passes` separable (2 radius + 1)-box means of uint8 RGB (H, W, 3), integers throughout."""
    a = rgb.astype(np.int64)
    for _ in range(passes):
        a = _box_1d(_box_1d(a, radius, 0), radius, 1)
    return a.astype(np.uint8)


def blur_halo(radius: int, passes: int = 2) -> int:
    """Pixels of context a blurred pixel depends on, each side."""
    return radius * passes


def fold(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Tissue seen through a dense second layer (`FOLD_LAYER`) where `alpha` (0..256) covers it."""
    return apply_ink(rgb, alpha, FOLD_LAYER)


# ---------------------------------------------------------------------------
# Labelled synthetic QC patches

QC_CLASSES = ("clean", "background", "pen", "fold", "blur")
_PATCH = 672  # level-0 px of a patch (the pipeline's crop); reduced 2x to the model's 336 px


def _line_through(rng: np.random.Generator, size: int, spread: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
    """A segment crossing a size x size patch at a random angle through a point within `spread` of its middle."""
    cx, cy = rng.uniform(0.5 - spread, 0.5 + spread, 2) * size
    ang = rng.uniform(0.0, math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    return (cx - 2 * size * ca, cy - 2 * size * sa), (cx + 2 * size * ca, cy + 2 * size * sa)


def _to_model_input(rgb: np.ndarray, jpeg_quality: int) -> np.ndarray:
    """As the pipeline sees a level-0 crop of a stored slide: JPEG-coded, decoded at half scale (336 px)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=jpeg_quality)
    buf.seek(0)
    image = Image.open(buf)
    image.draft("RGB", (rgb.shape[1] // 2, rgb.shape[0] // 2))  # libjpeg DCT scaling, as the tile reader
    image = image.convert("RGB")
    if image.size[0] != rgb.shape[1] // 2:
        image = image.reduce(image.size[0] // (rgb.shape[1] // 2))
    return np.asarray(image)


# Severity ranges of the planted artefacts: the clear cases (the tests' known answers) and milder ones,
# below and around the default thresholds, that the benchmark reports recall on.
SEVERITY = {
    "clear": {"tissue": (0.0, 0.2), "pen_half": (30.0, 200.0), "pen_cover": (0.08, 1.0),
              "fold_half": (60.0, 250.0), "fold_cover": (0.10, 1.0), "radius": (3, 7)},
    "mild": {"tissue": (0.2, 0.5), "pen_half": (8.0, 40.0), "pen_cover": (0.01, 0.08),
             "fold_half": (20.0, 80.0), "fold_cover": (0.03, 0.10), "radius": (1, 2)},
}


def qc_patches(per_class: int, seed: int = 0, jpeg_quality: int = 85, severity: str = "clear") -> Iterator[tuple[str, dict, np.ndarray]]:
    """`per_class` patches of each of QC_CLASSES as (label, details, uint8 RGB 336 x 336 x 3), deterministic.

    Each is a 672 px level-0 tile of the demo renderer (tissue classes drawn in turn), its artefact
    planted at level 0, then JPEG-coded at `jpeg_quality` and decoded at half scale as the pipeline's
    tile reader does. The artefacts:

    * clean: the tissue as rendered;
    * background: glass with tissue in a corner or along an edge covering 0-20 % of the patch;
    * pen: a stroke of green, blue or black ink, 60-400 px wide, crossing the patch (8 % of it or more);
    * fold: a band 120-500 px wide of tissue seen through a dense second layer (10 % of the patch or more);
    * blur: the whole patch defocused, box radius 3-7 px at level 0 (two passes: Gaussian sigma
      1.4-3.1 px at 336 px).

    `severity="mild"` plants weaker ones instead (SEVERITY): 20-50 % tissue, strokes covering 1-8 %,
    folds 3-10 %, box radius 1-2 (sigma 0.6-1.0 px at 336 px).
    """
    sev = SEVERITY[severity]
    spread = 0.2 if severity == "clear" else 0.5
    from pathgen.demo.slides import ADIPOSE, BACKGROUND, GLANDS, LYMPHOCYTES, NECROSIS, STROMA, TUMOR, _SlideRenderer

    tissue = [TUMOR, STROMA, GLANDS, LYMPHOCYTES, ADIPOSE, NECROSIS]
    n_tiles = per_class * len(QC_CLASSES)
    rows = -(-n_tiles // len(tissue))
    label_map = np.repeat(np.asarray(tissue, np.uint8)[None, :], rows, axis=0)
    renderer = _SlideRenderer(label_map, _PATCH, derive_seed(seed, "qc-tissue"), _PATCH)
    glass = np.asarray(_SlideRenderer(np.full((1, 1), BACKGROUND, np.uint8), _PATCH, derive_seed(seed, "qc-glass"), _PATCH).render(0, 0))
    coords = np.arange(_PATCH, dtype=np.float64) + 0.5
    k = 0
    for i in range(per_class):
        for label in QC_CLASSES:
            ty, tx = divmod(k, len(tissue))
            k += 1
            rgb = np.asarray(renderer.render(ty, tx))
            rng = rng_for(seed, "qc", severity, label, str(i)) if severity != "clear" else rng_for(seed, "qc", label, str(i))
            details: dict = {"tissue": int(label_map[ty, tx])}
            if label == "background":
                frac = float(rng.uniform(*sev["tissue"]))
                # tissue on one side of a line: a half-plane whose share of the patch is `frac`
                ang = float(rng.uniform(0, 2 * math.pi))
                nx, ny = math.cos(ang), math.sin(ang)
                proj = (coords[None, :] - _PATCH / 2) * nx + (coords[:, None] - _PATCH / 2) * ny
                cut = float(np.quantile(proj, 1.0 - frac)) if frac > 0 else float(proj.max()) + 1
                alpha = np.clip((proj - cut) * (256.0 / 8.0) + 128.0, 0, 256).astype(np.int64)[..., None]
                rgb = ((rgb.astype(np.int64) * alpha + glass.astype(np.int64) * (256 - alpha) + 128) >> 8).astype(np.uint8)
                details["tissue_fraction"] = frac
            elif label == "pen":
                ink = ("green", "blue", "black")[i % 3]
                while True:
                    p0, p1 = _line_through(rng, _PATCH, spread)
                    half = float(rng.uniform(*sev["pen_half"]))
                    alpha = segment_alpha(coords, coords, p0, p1, half)
                    if sev["pen_cover"][0] <= (alpha >= 128).mean() < sev["pen_cover"][1]:
                        break
                rgb = apply_ink(rgb, alpha, INKS[ink])
                details.update(ink=ink, width=2 * half, cover=float((alpha >= 128).mean()))
            elif label == "fold":
                while True:
                    p0, p1 = _line_through(rng, _PATCH, spread)
                    half = float(rng.uniform(*sev["fold_half"]))
                    alpha = segment_alpha(coords, coords, p0, p1, half, edge=20.0)
                    if sev["fold_cover"][0] <= (alpha >= 128).mean() < sev["fold_cover"][1]:
                        break
                rgb = fold(rgb, alpha)
                details.update(width=2 * half, cover=float((alpha >= 128).mean()))
            elif label == "blur":
                radius = int(rng.integers(sev["radius"][0], sev["radius"][1] + 1))
                rgb = box_blur(rgb, radius)
                details["radius"] = radius
            yield label, details, _to_model_input(rgb, jpeg_quality)
