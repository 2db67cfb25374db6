"""Synthetic H&E-like whole-slide images and the offline three-slide demo set.

`write_synthetic_slide` renders a label map (one class id per cell of
`cell_px` x `cell_px` level-0 pixels) into a tiled, JPEG-compressed pyramidal
TIFF laid out like an Aperio SVS file, which OpenSlide opens as vendor
`aperio` with `openslide.mpp-x` and `openslide.objective-power` set:

* page 0: level 0, tiled, description `Aperio Image Library ...|AppMag = ..|MPP = ..`;
* page 1: a stripped thumbnail (OpenSlide's associated image `thumbnail`;
  tifffile's SVS reader also expects it there);
* pages 2..: the reduced levels, tiled, each `level_downsample` times smaller.

OpenSlide's aperio driver makes every tiled page a level and computes each
downsample from the page dimensions, so downsamples are exactly 1, 4, 16, ...
when the level-0 size is divisible by them (approximately otherwise).

Level 0 is rendered tile by tile and never held whole. Every pixel is a
deterministic function of (seed, position): global structures (region
borders, nucleus positions, glands, fat cells) are laid out once per slide,
smooth fields come from hashed-lattice value noise sampled on a global grid of
one point per 4 x 4 pixels and upsampled with fixed weights, and grain is a
window of a per-slide noise bank at an offset hashed from the tile position,
so a tile's content does not depend on the order in which tiles are made.
Nuclei are precomputed sprites stamped (by maximum, which is order-free) at
seeded positions. The reduced levels are box averages of the level-0 pixels
accumulated while level 0 is written, so all levels agree. Colour comes from
a Beer-Lambert model with haematoxylin and eosin concentrations, read through
a lookup table.

The hot path uses only IEEE-exact float operations (add, multiply, sqrt,
comparisons), lookups and integer JPEG coding in one thread; the few
transcendental results (sprites, lookup tables, smoothed maps) are
precomputed and snapped to a 2**-16 grid, so the same arguments give the same
bytes (no timestamps are written).

Artefacts for quality control (pathgen.wsi.quality) can be planted on top:
`PenStroke`s of marker ink and `Defocus` rectangles rendered out of focus (a
two-pass integer box blur of the plain level-0 pixels; a tile in a box is
blurred with a halo taken from its neighbours' plain pixels, so tiles stay
independent of each other and of the order they are made in). In the demo
set, demo-lung-01 carries a green stroke and demo-colon-01 a blue stroke and
an out-of-focus block of tissue patches, placed from the label map so they
land on tissue at every `scale` (`demo_artefacts`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from pathgen.demo import artefacts
from pathgen.store.io import atomic_path, write_text
from pathgen.store.seeds import derive_seed, rng_for

BACKGROUND = 0
TUMOR = 1
STROMA = 2
GLANDS = 3
LYMPHOCYTES = 4
ADIPOSE = 5
NECROSIS = 6

TEXTURES: dict[int, str] = {
    TUMOR: "tumor",
    STROMA: "stroma",
    GLANDS: "glands",
    LYMPHOCYTES: "lymphocytes",
    ADIPOSE: "adipose",
    NECROSIS: "necrosis",
}

APERIO_HEADER = "Aperio Image Library v12.0.0"
SOFTWARE = "pathgen synthetic slide"

# Stain optical densities per unit concentration (R, G, B), after Ruifrok & Johnston.
_HEMATOXYLIN_OD = np.array([0.62, 0.76, 0.28])
_EOSIN_OD = np.array([0.05, 1.0, 0.42])
_GLASS_RGB = np.array([243.0, 243.0, 243.0])
_LUT_STEPS = 128  # lookup-table steps per unit of concentration
_LUT_NH = 4 * _LUT_STEPS  # haematoxylin concentration 0 .. 4
_LUT_NE = 3 * _LUT_STEPS  # eosin concentration 0 .. 3
_SUB = 16  # class-score grid points per label-map cell


def _snap(a: np.ndarray) -> np.ndarray:
    """Round to a 2**-16 grid as float32, so ULP-level differences in libm results vanish."""
    return (np.round(np.asarray(a, dtype=np.float64) * 65536.0) / 65536.0).astype(np.float32)


def _color_lut() -> np.ndarray:
    """Packed RGBA uint32 lookup: index h*_LUT_NE + e -> Beer-Lambert colour."""
    h = np.arange(_LUT_NH, dtype=np.float64)[:, None, None] / _LUT_STEPS
    e = np.arange(_LUT_NE, dtype=np.float64)[None, :, None] / _LUT_STEPS
    od = h * _HEMATOXYLIN_OD + e * _EOSIN_OD
    rgb = np.clip(np.round(_GLASS_RGB * np.exp(-od)), 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return np.ascontiguousarray(rgba.reshape(-1, 4)).view(np.uint32).ravel()


_LUT = _color_lut()

# ---------------------------------------------------------------------------
# Hashed lattice noise


_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0xBF58476D1CE4E5B9)
_K4 = np.uint64(0x94D049BB133111EB)


def _hash01(key: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point (broadcast iy, ix), from `key`."""
    hy = np.asarray(iy, dtype=np.int64).view(np.uint64) * _K1
    hx = np.asarray(ix, dtype=np.int64).view(np.uint64) * _K2
    h = (hy ^ hx) ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(30)
    h *= _K3
    h ^= h >> np.uint64(27)
    h *= _K4
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _noise_axis(pos: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lattice cell index (relative), smoothstep weight, lattice origin and lattice size for sample positions."""
    t = np.asarray(pos, dtype=np.float64) / scale
    i = np.floor(t).astype(np.int64)
    f = t - i
    w = (f * f * (3.0 - 2.0 * f)).astype(np.float32)
    origin = int(i.min())
    return i - origin, w, origin, int(i.max()) - origin + 2


def _value_noise(key: int, xs: np.ndarray, ys: np.ndarray, scale: float) -> np.ndarray:
    """Smooth value noise in [0, 1] of feature size `scale` px at the grid of positions ys x xs (pixel-centre units)."""
    ix, wx, ox, nx = _noise_axis(xs, scale)
    iy, wy, oy, ny = _noise_axis(ys, scale)
    lat = _hash01(key, np.arange(oy, oy + ny)[:, None], np.arange(ox, ox + nx)[None, :])
    rows = lat[:, ix] + (lat[:, ix + 1] - lat[:, ix]) * wx
    drow = rows[1:] - rows[:-1]
    out = np.take(drow, iy, axis=0)
    out *= wy[:, None]
    out += np.take(rows, iy, axis=0)
    return out


_LR = 4  # smooth fields are computed on a grid of one sample per _LR x _LR pixels
_UP_WEIGHTS = ((0, 0.625), (0, 0.875), (1, 0.125), (1, 0.375))  # (sample offset, weight) of pixel 4k + r


def _lr_positions(start: int, t: int) -> np.ndarray:
    """Centres (pixel-centre units) of the low-resolution samples of a tile, with one sample of border."""
    return start - _LR / 2 + _LR * np.arange(t // _LR + 2, dtype=np.float64)


def _upsample(a: np.ndarray) -> np.ndarray:
    """Bilinear 4x upsampling of an (m+2, m+2) low-resolution grid (one-sample border) to (4m, 4m).

    Uses only fixed binary weights, so a pixel's value depends on its
    position alone, not on the tile it is rendered in.
    """
    m = a.shape[0] - 2
    d = a[:, 1:] - a[:, :-1]
    ax = np.empty((a.shape[0], m, _LR), np.float32)
    for r, (lo, w) in enumerate(_UP_WEIGHTS):
        np.multiply(d[:, lo : lo + m], np.float32(w), out=ax[:, :, r])
        ax[:, :, r] += a[:, lo : lo + m]
    ax = ax.reshape(a.shape[0], m * _LR)
    dy = ax[1:] - ax[:-1]
    out = np.empty((m, _LR, m * _LR), np.float32)
    for r, (lo, w) in enumerate(_UP_WEIGHTS):
        np.multiply(dy[lo : lo + m], np.float32(w), out=out[:, r])
        out[:, r] += ax[lo : lo + m]
    return out.reshape(m * _LR, m * _LR)


# ---------------------------------------------------------------------------
# Nucleus sprites


@dataclass(frozen=True)
class _SpriteSpec:
    size: int  # sprite box (px, even)
    a: tuple[float, float]  # semi-major axis range (px)
    ratio: tuple[float, float]  # minor / major axis ratio range
    h: tuple[float, float]  # haematoxylin concentration range
    irregular: float  # amplitude of the outline perturbation
    chromatin: float  # amplitude of the internal texture
    rim: float  # extra darkness at the nuclear membrane
    nucleolus: float  # probability of a dark nucleolus
    oriented: int  # orientation bins (0: random orientation per sprite)
    count: int  # sprites per bin (or in all when not oriented)


_SPRITES: dict[str, _SpriteSpec] = {
    "tumor": _SpriteSpec(72, (15.0, 27.0), (0.55, 0.95), (1.25, 1.95), 0.12, 0.45, 0.35, 0.35, 0, 64),
    "lymph": _SpriteSpec(34, (10.5, 13.5), (0.82, 1.0), (2.15, 2.6), 0.04, 0.12, 0.10, 0.0, 0, 24),
    "spindle": _SpriteSpec(80, (20.0, 34.0), (0.14, 0.24), (1.3, 1.8), 0.05, 0.15, 0.10, 0.0, 24, 3),
    "gland": _SpriteSpec(36, (12.0, 15.0), (0.5, 0.65), (1.3, 1.65), 0.04, 0.18, 0.15, 0.0, 24, 3),
    "dust": _SpriteSpec(16, (2.0, 5.0), (0.55, 1.0), (1.4, 2.2), 0.25, 0.1, 0.0, 0.0, 0, 32),
    "ghost": _SpriteSpec(56, (13.0, 22.0), (0.7, 0.95), (0.22, 0.4), 0.08, 0.5, 0.6, 0.0, 0, 16),
}
_SPRITE_TYPES = list(_SPRITES)


def _sprite_bank(spec: _SpriteSpec, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 haematoxylin sprites for one nucleus type."""
    s = spec.size
    c = (s - 1) / 2.0
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) - c
    n = spec.count * max(spec.oriented, 1)
    bank = np.zeros((n, s, s), np.float64)
    for k in range(n):
        a = rng.uniform(*spec.a)
        b = a * rng.uniform(*spec.ratio)
        if spec.oriented:
            phi = math.pi * (k // spec.count) / spec.oriented + rng.normal(0, 0.04)
        else:
            phi = rng.uniform(0, math.pi)
        cp, sp = math.cos(phi), math.sin(phi)
        u = xx * cp + yy * sp
        v = -xx * sp + yy * cp
        theta = np.arctan2(v / b, u / a)
        r = np.ones_like(theta)
        for harmonic in range(2, 6):
            r += spec.irregular * rng.uniform(0.3, 1.0) / (harmonic - 1) * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / r
        depth = (1.0 - rho) * b  # ~ px inside the outline
        alpha = np.clip(depth / 1.6 + 0.5, 0.0, 1.0)
        tex = ndimage.gaussian_filter(rng.standard_normal((s, s)), sigma=max(1.0, 0.12 * b))
        tex /= tex.std() + 1e-9
        dark = 1.0 + spec.chromatin * 0.5 * np.clip(tex, -2, 2)
        dark += spec.rim * np.exp(-((depth - 1.5) / 1.8) ** 2)
        if rng.random() < spec.nucleolus:
            ang, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35) * b
            ny, nx = rad * math.sin(ang), rad * math.cos(ang)
            dark += 0.45 * np.exp(-((xx - nx) ** 2 + (yy - ny) ** 2) / (2 * rng.uniform(1.5, 2.5) ** 2))
        bank[k] = alpha * rng.uniform(*spec.h) * np.clip(dark, 0.3, None)
    return _snap(bank)


# ---------------------------------------------------------------------------
# Region field


def _lin_axis(pos: np.ndarray, f: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation index and weight of positions on a grid of spacing `f` px (clamped at the edges)."""
    u = np.clip(np.asarray(pos, np.float64) / f - 0.5, 0.0, size - 1.0)
    i = np.minimum(np.floor(u).astype(np.int64), size - 2)
    return i, (u - i).astype(np.float32)


class _RegionField:
    """Per-class scores on a fine grid; the class at a point is the argmax of their bilinear interpolation.

    Scores are the smoothed one-hot label map plus smooth noise, so region
    borders are rounded and slightly irregular but stay within a fraction of a
    cell of the label map's cell edges. Near a border the classes are blended
    over ~12 px (soft weights from the score margin).
    """

    def __init__(self, label_map: np.ndarray, cell_px: int, seed: int):
        self.classes = [int(c) for c in np.unique(label_map)]
        self.f = cell_px / _SUB
        self.sharp = 0.85 * self.f  # weight slope per unit of score margin
        rows, cols = label_map.shape
        self.shape = (rows * _SUB, cols * _SUB)
        big = np.repeat(np.repeat(label_map, _SUB, axis=0), _SUB, axis=1)
        scores = []
        for c in self.classes:
            s = ndimage.gaussian_filter((big == c).astype(np.float64), sigma=0.42 * _SUB, mode="nearest")
            rng = rng_for(seed, "borders", str(c))
            for sigma, amp in ((0.6 * _SUB, 0.09), (0.15 * _SUB, 0.03)):
                n = ndimage.gaussian_filter(rng.standard_normal(self.shape), sigma=sigma, mode="wrap")
                s += amp * n / (n.std() + 1e-12)
            scores.append(s)
        self.scores = _snap(np.stack(scores))
        self.argmax = np.argmax(self.scores, axis=0).astype(np.int16)
        top2 = np.sort(self.scores, axis=0)[-2:] if len(self.classes) > 1 else np.stack([self.scores[0] - 1, self.scores[0]])
        self.margin = top2[1] - top2[0]
        self.top = top2[1]

    def weights(self, xs: np.ndarray, ys: np.ndarray) -> int | dict[int, np.ndarray]:
        """The class id when the grid ys x xs lies wholly in one class, else {class id: weight grid} (weights sum to 1)."""
        ix, wx = _lin_axis(xs, self.f, self.shape[1])
        iy, wy = _lin_axis(ys, self.f, self.shape[0])
        ya, yb, xa, xb = int(iy[0]), int(iy[-1]) + 2, int(ix[0]), int(ix[-1]) + 2
        window = self.argmax[ya:yb, xa:xb]
        lo, hi = int(window.min()), int(window.max())
        half = 0.5 / self.sharp
        # argmax and margin are preserved under convex combination
        if lo == hi and float(self.margin[ya:yb, xa:xb].min()) >= half:
            return self.classes[lo]
        top = self.top[ya:yb, xa:xb]
        near = [k for k in range(len(self.classes)) if float((self.scores[k, ya:yb, xa:xb] - top).max()) > -2 * half]
        ix, iy = ix - xa, iy - ya
        vals = []
        for k in near:
            s = self.scores[k, ya:yb, xa:xb]
            rows = s[:, ix] + (s[:, ix + 1] - s[:, ix]) * wx
            vals.append(rows[iy] + (rows[iy + 1] - rows[iy]) * wy[:, None])
        vals_a = np.stack(vals)
        out: dict[int, np.ndarray] = {}
        total = np.zeros(vals_a.shape[1:], np.float32)
        for n, k in enumerate(near):
            others = np.delete(vals_a, n, axis=0).max(axis=0) if len(near) > 1 else vals_a[n] - 1.0
            w = np.clip((vals_a[n] - others) * np.float32(self.sharp) + np.float32(0.5), 0.0, 1.0)
            if float(w.max()) > 0.0:
                out[self.classes[k]] = w
                total += w
        for w in out.values():
            w /= total
        return out

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Class ids at level-0 points (pixel-centre units)."""
        h, w = self.shape
        u = np.clip(np.asarray(x, np.float64) / self.f - 0.5, 0.0, w - 1.0)
        v = np.clip(np.asarray(y, np.float64) / self.f - 0.5, 0.0, h - 1.0)
        i = np.minimum(np.floor(u).astype(np.int64), w - 2)
        j = np.minimum(np.floor(v).astype(np.int64), h - 2)
        wx, wy = (u - i).astype(np.float32), (v - j).astype(np.float32)
        s = self.scores
        top = s[:, j, i] + (s[:, j, i + 1] - s[:, j, i]) * wx
        bot = s[:, j + 1, i] + (s[:, j + 1, i + 1] - s[:, j + 1, i]) * wx
        vals = top + (bot - top) * wy
        return np.asarray(self.classes, np.uint8)[np.argmax(vals, axis=0)]


# ---------------------------------------------------------------------------
# Slide layout: nuclei, glands, and the tile renderer


def _hex_points(rng: np.random.Generator, width: int, height: int, spacing: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """A jittered hexagonal point lattice over [0, width) x [0, height)."""
    dy = spacing * 0.866
    ny, nx = int(math.ceil(height / dy)) + 1, int(math.ceil(width / spacing)) + 1
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    x = (gx + 0.5 * (gy % 2)) * spacing + rng.uniform(-jitter, jitter, gx.shape) * spacing
    y = (gy + 0.5) * dy + rng.uniform(-jitter, jitter, gy.shape) * dy
    keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return x[keep], y[keep]


@dataclass(frozen=True)
class PenStroke:
    """A marker stroke over the slide: ink (a key of `artefacts.INKS`), the segment (level-0 px) and half its width."""

    ink: str
    x0: float
    y0: float
    x1: float
    y1: float
    half_width: float
    edge: float = 6.0  # px of the soft edge


@dataclass(frozen=True)
class Defocus:
    """An out-of-focus rectangle [x0, x1) x [y0, y1) of level-0 px: two passes of a (2 radius + 1)-box blur."""

    x0: int
    y0: int
    x1: int
    y1: int
    radius: int = 5


_FIBER_LUT = 8192  # entries in the fibre cross-section profile
_FIBER_PERIOD = 768.0  # px across which the profile repeats


def _fiber_profile(rng: np.random.Generator) -> np.ndarray:
    """A periodic 1-D cross-section of parallel collagen fibres of random width, spacing and density, in [0, 1]."""
    pos = np.arange(_FIBER_LUT, dtype=np.float64) * (_FIBER_PERIOD / _FIBER_LUT)
    prof = np.zeros(_FIBER_LUT)
    centre = 0.0
    while centre < _FIBER_PERIOD:
        width = rng.uniform(1.8, 5.0)
        d = np.abs(pos - centre)
        d = np.minimum(d, _FIBER_PERIOD - d)
        prof += rng.uniform(0.45, 1.0) * np.exp(-0.5 * (d / width) ** 2)
        centre += width * 2.0 + rng.uniform(1.0, 9.0) + (rng.uniform(8.0, 22.0) if rng.random() < 0.12 else 0.0)
    return _snap(np.clip(prof, 0.0, 1.0))


# (nucleus type, class it lives in, spacing px, jitter, keep probability)
_NUCLEUS_LAYOUT = [
    ("tumor", TUMOR, 50.0, 0.3, 0.9),
    ("lymph", TUMOR, 150.0, 0.5, 0.35),
    ("lymph", LYMPHOCYTES, 27.0, 0.22, 0.93),
    ("spindle", STROMA, 105.0, 0.45, 0.6),
    ("lymph", STROMA, 130.0, 0.5, 0.4),
    ("spindle", GLANDS, 150.0, 0.45, 0.5),
    ("lymph", GLANDS, 160.0, 0.5, 0.35),
    ("spindle", ADIPOSE, 330.0, 0.45, 0.35),
    ("dust", NECROSIS, 34.0, 0.5, 0.75),
    ("ghost", NECROSIS, 95.0, 0.45, 0.55),
    ("lymph", NECROSIS, 160.0, 0.5, 0.3),
]

_GLAND_SPACING = 236.0
_GRAIN = 1024  # side of the white-noise bank that tiles take shifted windows from
_FAT_SPACING = 300.0


class _SlideRenderer:
    """Renders level-0 tiles of one synthetic slide; tiles are independent of each other."""

    def __init__(self, label_map: np.ndarray, cell_px: int, seed: int, tile: int,
                 pen_strokes: Sequence[PenStroke] = (), defocus: Sequence[Defocus] = ()):
        self.tile_px = tile
        self.pen_strokes = tuple(pen_strokes)
        self.defocus = tuple(defocus)
        self._plain_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.height = label_map.shape[0] * cell_px
        self.width = label_map.shape[1] * cell_px
        self.tiles_down = -(-self.height // tile)
        self.tiles_across = -(-self.width // tile)
        self.seed = seed
        self.field = _RegionField(label_map, cell_px, seed)
        self.key = {name: derive_seed(seed, "noise", name) for name in ("stain", "mid", "cell", "fine", "fat_x", "fat_y", "warp1", "warp2", "bundle", "grain")}
        grng = rng_for(seed, "grain")
        self.grain = grng.random((2, _GRAIN, _GRAIN), dtype=np.float32)
        self.grain -= np.float32(0.5)
        granules = ndimage.gaussian_filter(grng.standard_normal((_GRAIN, _GRAIN)), sigma=1.6, mode="wrap")
        self.granules = _snap(np.clip(granules / granules.std() * 0.25 + 0.25, 0.0, None))
        srng = rng_for(seed, "stain-balance")
        self.e_gain = float(srng.uniform(0.92, 1.08))
        self.h_gain = float(srng.uniform(0.92, 1.08))
        self.fiber_angle = float(srng.uniform(0, math.pi))
        self.fiber_lut = _fiber_profile(rng_for(seed, "fibres"))
        self.banks = {name: _sprite_bank(spec, rng_for(seed, "sprites", name)) for name, spec in _SPRITES.items()}
        self._layout_glands()
        self._layout_nuclei()

    # -- layout --------------------------------------------------------------

    def _layout_glands(self) -> None:
        """Glands on a jittered hexagonal lattice, thinned, with overlapping ones dropped."""
        rng = rng_for(self.seed, "glands")
        pw, ph = self.tiles_across * self.tile_px, self.tiles_down * self.tile_px
        a = _GLAND_SPACING
        ny, nx = int(math.ceil(ph / (0.866 * a))) + 1, int(math.ceil(pw / a)) + 1
        gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
        cx = (gx + 0.5 * (gy % 2) + 0.5 + rng.uniform(-0.22, 0.22, gx.shape)) * a
        cy = (gy * 0.866 + 0.5 + rng.uniform(-0.22, 0.22, gy.shape)) * a
        r = rng.uniform(30.0, 62.0, gx.shape)
        t = rng.uniform(32.0, 42.0, gx.shape)
        phase = rng.uniform(0, 2 * math.pi, gx.shape)
        keep = rng.random(gx.shape) < 0.88
        cx, cy, r, t, phase, keep = (v.ravel() for v in (cx, cy, r, t, phase, keep))
        keep &= self.field.at(cx, cy) == GLANDS
        outer = 0.7 * (r + t)
        for k in range(8):  # keep glands that lie (mostly) inside the gland region
            ang = k * math.pi / 4
            keep &= self.field.at(cx + outer * math.cos(ang), cy + outer * math.sin(ang)) == GLANDS
        idx = np.flatnonzero(keep)
        if len(idx) > 1:
            tree = cKDTree(np.stack([cx[idx], cy[idx]], axis=1))
            pairs = tree.query_pairs(r=2 * (62.0 + 42.0) + 10.0, output_type="ndarray")
            pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
            for i, j in pairs.tolist():
                gi, gj = idx[i], idx[j]
                if keep[gi] and keep[gj]:
                    if math.hypot(cx[gi] - cx[gj], cy[gi] - cy[gj]) < r[gi] + t[gi] + r[gj] + t[gj] + 10.0:
                        keep[gj] = False
        self.glands = np.stack([cx[keep], cy[keep], r[keep], t[keep], phase[keep]], axis=1)

    def _gland_nuclei(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = _SPRITES["gland"]
        xs, ys, idx = [], [], []
        rng = rng_for(self.seed, "gland-nuclei")
        for cx, cy, r, t, phase in self.glands:
            rr = r + 0.5 * t
            n = max(6, int(round(2 * math.pi * rr / 21.0)))
            ang = phase + 2 * math.pi * np.arange(n) / n + rng.normal(0, 0.03, n)
            rad = rr + rng.normal(0, 1.5, n)
            xs.append(cx + rad * np.cos(ang))
            ys.append(cy + rad * np.sin(ang))
            bins = np.round((ang % math.pi) / math.pi * spec.oriented).astype(np.int64) % spec.oriented
            idx.append(bins * spec.count + rng.integers(0, spec.count, n))
        if not xs:
            return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)

    def _layout_nuclei(self) -> None:
        pw, ph = self.tiles_across * self.tile_px, self.tiles_down * self.tile_px
        all_x, all_y, all_type, all_sprite = [], [], [], []
        gland_tree = cKDTree(self.glands[:, :2]) if len(self.glands) else None
        max_outer = float((self.glands[:, 2] + self.glands[:, 3]).max()) if len(self.glands) else 0.0
        for n, (name, cls, spacing, jitter, keep_p) in enumerate(_NUCLEUS_LAYOUT):
            if cls not in self.field.classes:
                continue
            rng = rng_for(self.seed, "nuclei", str(n), name)
            x, y = _hex_points(rng, pw, ph, spacing, jitter)
            keep = (rng.random(x.shape) < keep_p) & (self.field.at(x, y) == cls)
            spec = _SPRITES[name]
            if spec.oriented:
                ang = self.fiber_angle + rng.normal(0.0, 0.18, x.shape)
                bins = np.round((ang % math.pi) / math.pi * spec.oriented).astype(np.int64) % spec.oriented
                sprite = bins * spec.count + rng.integers(0, spec.count, x.shape)
            else:
                sprite = rng.integers(0, spec.count, x.shape)
            x, y, sprite = x[keep], y[keep], sprite[keep]
            if cls == GLANDS and gland_tree is not None and len(x):
                dist, which = gland_tree.query(np.stack([x, y], axis=1), distance_upper_bound=max_outer + 40.0)
                hit = np.isfinite(dist)
                outer = np.full(x.shape, -1.0)
                outer[hit] = self.glands[which[hit], 2] + self.glands[which[hit], 3] + spec.size / 3
                ok = dist > outer
                x, y, sprite = x[ok], y[ok], sprite[ok]
            all_x.append(x)
            all_y.append(y)
            all_type.append(np.full(x.shape, _SPRITE_TYPES.index(name)))
            all_sprite.append(sprite)
        gx, gy, gs = self._gland_nuclei()
        all_x.append(gx)
        all_y.append(gy)
        all_type.append(np.full(gx.shape, _SPRITE_TYPES.index("gland")))
        all_sprite.append(gs)
        x = np.round(np.concatenate(all_x)).astype(np.int64)
        y = np.round(np.concatenate(all_y)).astype(np.int64)
        typ = np.concatenate(all_type).astype(np.int64)
        spr = np.concatenate(all_sprite).astype(np.int64)
        half = np.array([_SPRITES[name].size // 2 for name in _SPRITE_TYPES])[typ]
        # bucket every stamp into each tile it touches
        t = self.tile_px
        keys, members = [], []
        tx0, tx1 = (x - half) // t, (x + half) // t
        ty0, ty1 = (y - half) // t, (y + half) // t
        idx = np.arange(len(x))
        for txs, tys, cond in ((tx0, ty0, None), (tx1, ty0, tx1 != tx0), (tx0, ty1, ty1 != ty0), (tx1, ty1, (tx1 != tx0) & (ty1 != ty0))):
            m = np.ones(len(x), bool) if cond is None else cond
            m &= (txs >= 0) & (txs < self.tiles_across) & (tys >= 0) & (tys < self.tiles_down)
            keys.append(tys[m] * self.tiles_across + txs[m])
            members.append(idx[m])
        keys_a, members_a = np.concatenate(keys), np.concatenate(members)
        order = np.lexsort((members_a, keys_a))
        self._stamp_keys = keys_a[order]
        self._stamp_members = members_a[order]
        self._nx, self._ny, self._ntype, self._nsprite, self._nhalf = x, y, typ, spr, half
        self.nucleus_count = len(x)

    # -- rendering -------------------------------------------------------------

    def _noise(self, tc: _Tile, name: str, scale: float) -> np.ndarray:
        """Value noise `name` on the tile's low-resolution grid (cached per tile)."""
        if name not in tc.cache:
            tc.cache[name] = _value_noise(self.key[name], tc.xs, tc.ys, scale)
        return tc.cache[name]

    def _base(self, c: int, tc: _Tile) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Smooth haematoxylin and eosin concentrations of class `c` on the low-resolution grid."""
        if c == BACKGROUND:
            return 0.008, 0.012
        mid = self._noise(tc, "mid", 40.0)
        if c == TUMOR:
            return self._noise(tc, "cell", 14.0) * np.float32(0.12) + np.float32(0.14), mid * np.float32(0.18) + np.float32(0.30)
        if c == STROMA:
            return 0.035, mid * np.float32(0.12) + np.float32(0.27)
        if c == GLANDS:
            e = mid * np.float32(0.10) + np.float32(0.40)
            e += self._noise(tc, "cell", 14.0) * np.float32(0.08)
            return 0.045, e
        if c == LYMPHOCYTES:
            return self._noise(tc, "cell", 14.0) * np.float32(0.10) + np.float32(0.16), mid * np.float32(0.10) + np.float32(0.20)
        if c == ADIPOSE:
            return 0.012, 0.025
        if c == NECROSIS:
            return self._noise(tc, "fine", 9.0) * np.float32(0.10) + np.float32(0.05), mid * np.float32(0.10) + np.float32(0.17)
        raise ValueError(f"unknown class id {c}; known: 0 (background), {sorted(TEXTURES)}")

    def _fibers(self, tc: _Tile, e: np.ndarray, weight: np.ndarray | None, stain: np.ndarray) -> None:
        """Add wavy collagen streaks along the slide's fibre angle, broken into bundles."""
        ca, sa = math.cos(self.fiber_angle), math.sin(self.fiber_angle)
        v = self._noise(tc, "warp1", 260.0) * np.float32(220.0)
        v += self._noise(tc, "warp2", 60.0) * np.float32(30.0)
        v += self._noise(tc, "fine", 9.0) * np.float32(5.0)
        v += (tc.ys.astype(np.float32) * np.float32(ca))[:, None]
        v -= (tc.xs.astype(np.float32) * np.float32(sa))[None, :]
        v += np.float32(65536.0)
        v *= np.float32(_FIBER_LUT / _FIBER_PERIOD)
        idx = _upsample(v).astype(np.int32)
        idx &= _FIBER_LUT - 1
        fib = np.take(self.fiber_lut, idx)
        amp = self._noise(tc, "bundle", 90.0) * np.float32(1.1 * 0.55) + np.float32(0.25 * 0.55)
        amp *= stain
        if weight is not None:
            amp *= weight
        fib *= _upsample(amp)
        e += fib

    def _membranes(self, tc: _Tile, h: np.ndarray, e: np.ndarray, weight: np.ndarray | None) -> None:
        """Add adipocyte membranes: the edges of the Voronoi cells of a jittered point grid.

        Candidate cell centres are those within a few pixels of the nearest one
        at some low-resolution sample; the edge distance is computed per pixel.
        """
        a = _FAT_SPACING
        t = self.tile_px
        gx0, gx1 = int(math.floor(tc.xs[0] / a)) - 1, int(math.floor(tc.xs[-1] / a)) + 1
        gy0, gy1 = int(math.floor(tc.ys[0] / a)) - 1, int(math.floor(tc.ys[-1] / a)) + 1
        gy, gx = np.mgrid[gy0 : gy1 + 1, gx0 : gx1 + 1]
        px = ((gx + 0.5 + 0.8 * (_hash01(self.key["fat_x"], gy, gx) - 0.5)) * a).astype(np.float32).ravel()
        py = ((gy + 0.5 + 0.8 * (_hash01(self.key["fat_y"], gy, gx) - 0.5)) * a).astype(np.float32).ravel()
        lx, ly = tc.xs[::2].astype(np.float32), tc.ys[::2].astype(np.float32)
        dist = np.sqrt((ly[None, :, None] - py[:, None, None]) ** 2 + (lx[None, None, :] - px[:, None, None]) ** 2)
        dist -= dist.min(axis=0)
        cand = np.flatnonzero((dist < np.float32(4 * _LR)).any(axis=(1, 2)))
        xs = np.arange(tc.x0, tc.x0 + t, dtype=np.float32) + np.float32(0.5)
        ys = np.arange(tc.y0, tc.y0 + t, dtype=np.float32) + np.float32(0.5)
        m1 = np.full((t, t), np.inf, np.float32)
        m2 = m1.copy()
        d = np.empty((t, t), np.float32)
        for k in cand.tolist():
            dx = xs - px[k]
            dy = ys - py[k]
            np.add((dy * dy)[:, None], (dx * dx)[None, :], out=d)
            np.minimum(m2, np.maximum(m1, d), out=m2)
            np.minimum(m1, d, out=m1)
        np.sqrt(m2, out=m2)
        np.sqrt(m1, out=m1)
        m2 -= m1  # twice the distance to the nearest cell edge
        m2 *= np.float32(-0.32)
        m2 += np.float32(1.6)
        mem = np.clip(m2, 0.0, 1.0, out=m2)
        if weight is not None:
            mem *= _upsample(weight)
        e += mem * np.float32(0.58)
        h += mem * np.float32(0.05)

    def _draw_glands(self, tc: _Tile, h: np.ndarray, e: np.ndarray) -> None:
        """Draw the glands that touch the tile: a ring of amphophilic epithelium around a white lumen."""
        t = self.tile_px
        g = self.glands
        if not len(g):
            return
        x0, y0 = tc.x0, tc.y0
        ext = g[:, 2] + g[:, 3] + 2 * _LR
        sel = (g[:, 0] + ext > x0) & (g[:, 0] - ext < x0 + t) & (g[:, 1] + ext > y0) & (g[:, 1] - ext < y0 + t)
        if not sel.any():
            return
        far = np.float32(1e4)
        lumen_d = np.full((len(tc.ys), len(tc.xs)), far, np.float32)  # signed distance to the lumen edge
        ring_d = lumen_d.copy()  # signed distance to the gland's outer edge
        for cx, cy, r, th, _ in g[sel]:
            out = r + th + 2 * _LR
            i0, i1 = np.searchsorted(tc.xs, [cx - out, cx + out])
            j0, j1 = np.searchsorted(tc.ys, [cy - out, cy + out])
            if i0 >= i1 or j0 >= j1:
                continue
            dx = (tc.xs[i0:i1] - cx).astype(np.float32)
            dy = (tc.ys[j0:j1] - cy).astype(np.float32)
            d = np.sqrt((dy * dy)[:, None] + (dx * dx)[None, :])
            np.minimum(lumen_d[j0:j1, i0:i1], d - np.float32(r), out=lumen_d[j0:j1, i0:i1])
            np.minimum(ring_d[j0:j1, i0:i1], d - np.float32(r + th), out=ring_d[j0:j1, i0:i1])
        for dist, h_in, e_in in ((ring_d, 0.20, 0.30), (lumen_d, 0.012, 0.05)):
            alpha = _upsample(dist)
            alpha *= np.float32(-0.6)
            alpha += np.float32(0.5)
            np.clip(alpha, 0.0, 1.0, out=alpha)
            h += (np.float32(h_in) - h) * alpha
            e += (np.float32(e_in) - e) * alpha

    def _stamp_nuclei(self, ty: int, tx: int) -> np.ndarray | None:
        """Haematoxylin of all nuclei touching the tile (max of their sprites), or None."""
        key = ty * self.tiles_across + tx
        lo = np.searchsorted(self._stamp_keys, key, side="left")
        hi = np.searchsorted(self._stamp_keys, key, side="right")
        if lo == hi:
            return None
        t = self.tile_px
        x0, y0 = tx * t, ty * t
        dark = np.zeros((t, t), np.float32)
        members = self._stamp_members[lo:hi]
        banks = [self.banks[name] for name in _SPRITE_TYPES]
        for cx, cy, typ, spr, half in zip(
            (self._nx[members] - x0).tolist(),
            (self._ny[members] - y0).tolist(),
            self._ntype[members].tolist(),
            self._nsprite[members].tolist(),
            self._nhalf[members].tolist(),
            strict=True,
        ):
            sprite = banks[typ][spr]
            s = 2 * half
            ax, ay = cx - half, cy - half
            sx, sy = max(0, -ax), max(0, -ay)
            dx, dy = max(0, ax), max(0, ay)
            w, hgt = min(s - sx, t - dx), min(s - sy, t - dy)
            if w <= 0 or hgt <= 0:
                continue
            view = dark[dy : dy + hgt, dx : dx + w]
            np.maximum(view, sprite[sy : sy + hgt, sx : sx + w], out=view)
        return dark

    def render(self, ty: int, tx: int) -> Image.Image:
        """The t x t RGB level-0 tile at tile row `ty`, column `tx`, with its planted artefacts."""
        if not self.pen_strokes and not self.defocus:
            return self._render_plain(ty, tx)
        t = self.tile_px
        x0, y0 = tx * t, ty * t
        rgb = None
        for box in self.defocus:
            # the box's pixels in this tile, blurred from the plain pixels around them (halo from the neighbours)
            bx0, by0 = max(box.x0, x0), max(box.y0, y0)
            bx1, by1 = min(box.x1, x0 + t), min(box.y1, y0 + t)
            if bx0 >= bx1 or by0 >= by1:
                continue
            if rgb is None:
                rgb = self._plain_array(ty, tx).copy()
            halo = artefacts.blur_halo(box.radius)
            context = self._context(bx0 - halo, by0 - halo, bx1 + halo, by1 + halo)
            blurred = artefacts.box_blur(context, box.radius)
            rgb[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = blurred[halo:-halo, halo:-halo]
        if rgb is None:
            rgb = self._plain_array(ty, tx)
        xs = np.arange(x0, x0 + t, dtype=np.float64) + 0.5
        ys = np.arange(y0, y0 + t, dtype=np.float64) + 0.5
        for stroke in self.pen_strokes:
            reach = stroke.half_width + 2 * stroke.edge
            lo_x, hi_x = min(stroke.x0, stroke.x1) - reach, max(stroke.x0, stroke.x1) + reach
            lo_y, hi_y = min(stroke.y0, stroke.y1) - reach, max(stroke.y0, stroke.y1) + reach
            if hi_x < x0 or lo_x > x0 + t or hi_y < y0 or lo_y > y0 + t:
                continue
            alpha = artefacts.segment_alpha(xs, ys, (stroke.x0, stroke.y0), (stroke.x1, stroke.y1), stroke.half_width, stroke.edge)
            if alpha.any():
                rgb = artefacts.apply_ink(rgb, alpha, artefacts.INKS[stroke.ink])
        return Image.fromarray(rgb)

    def _plain_array(self, ty: int, tx: int) -> np.ndarray:
        """The tile without artefacts as a read-only uint8 array, cached for its neighbours' defocus halos."""
        key = (ty, tx)
        if key in self._plain_cache:
            self._plain_cache.move_to_end(key)
            return self._plain_cache[key]
        rgb = np.asarray(self._render_plain(ty, tx))
        rgb.setflags(write=False)
        self._plain_cache[key] = rgb
        while len(self._plain_cache) > 2 * self.tiles_across + 3:  # two rows of tiles, written in row order
            self._plain_cache.popitem(last=False)
        return rgb

    def _context(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Plain level-0 pixels of [x0, x1) x [y0, y1), edge-replicated outside the tile grid."""
        t = self.tile_px
        gx0, gy0 = max(x0, 0), max(y0, 0)
        gx1, gy1 = min(x1, self.tiles_across * t), min(y1, self.tiles_down * t)
        out = np.empty((gy1 - gy0, gx1 - gx0, 3), np.uint8)
        for ty in range(gy0 // t, -(-gy1 // t)):
            for tx in range(gx0 // t, -(-gx1 // t)):
                ax0, ay0 = max(gx0, tx * t), max(gy0, ty * t)
                ax1, ay1 = min(gx1, (tx + 1) * t), min(gy1, (ty + 1) * t)
                tile = self._plain_array(ty, tx)
                out[ay0 - gy0 : ay1 - gy0, ax0 - gx0 : ax1 - gx0] = tile[ay0 - ty * t : ay1 - ty * t, ax0 - tx * t : ax1 - tx * t]
        pad = ((gy0 - y0, y1 - gy1), (gx0 - x0, x1 - gx1), (0, 0))
        if gy0 > y0 or gy1 < y1 or gx0 > x0 or gx1 < x1:
            out = np.pad(out, pad, mode="edge")
        return out

    def _render_plain(self, ty: int, tx: int) -> Image.Image:
        """The t x t RGB level-0 tile at tile row `ty`, column `tx`, as the tissue alone."""
        t = self.tile_px
        tc = _Tile(tx * t, ty * t, t)
        weights = self.field.weights(tc.xs, tc.ys)
        classes = [weights] if isinstance(weights, int) else sorted(weights)
        tissue = classes != [BACKGROUND]
        if tissue:
            stain = self._noise(tc, "stain", 700.0) * np.float32(0.24 * self.e_gain) + np.float32(0.88 * self.e_gain)
        else:
            stain = np.float32(1.0)
        # smooth base, blended on the low-resolution grid, then upsampled
        if isinstance(weights, int):
            hc, ec = self._base(weights, tc)
            h = _lr_to_full(np.float32(hc) * np.float32(self.h_gain), t)
            e = _lr_to_full(np.float32(ec) * stain, t)
        else:
            h_lr = np.zeros((len(tc.ys), len(tc.xs)), np.float32)
            e_lr = np.zeros_like(h_lr)
            for c in classes:
                hc, ec = self._base(c, tc)
                h_lr += weights[c] * hc
                e_lr += weights[c] * ec
            e_lr *= stain
            h_lr *= np.float32(self.h_gain)
            h = _upsample(h_lr)
            e = _upsample(e_lr)
        # full-resolution detail
        sel = None if isinstance(weights, int) else weights
        if STROMA in classes:
            self._fibers(tc, e, None if sel is None else sel[STROMA], stain)
        if ADIPOSE in classes:
            self._membranes(tc, h, e, None if sel is None else sel[ADIPOSE])
        if GLANDS in classes:
            self._draw_glands(tc, h, e)
        oy, ox = (int(v) for v in (_hash01(self.key["grain"], np.array([ty, ty + 7919]), tx) * (_GRAIN - t)))
        if NECROSIS in classes:
            gran = _wrap_window(self.granules, tc.y0, tc.x0, t) * np.float32(0.45)
            if sel is not None:
                gran *= _upsample(sel[NECROSIS])
            e += gran
        dark = self._stamp_nuclei(ty, tx)
        if dark is not None:
            cover = dark * np.float32(2.0)
            np.minimum(cover, 1.0, out=cover)
            h *= np.float32(1.0) - cover
            h += dark
            cover *= np.float32(0.75)
            e *= np.float32(1.0) - cover
        grain = self.grain[:, oy : oy + t, ox : ox + t]
        amp_e, amp_h = (0.06, 0.04) if tissue else (0.012, 0.008)
        e += grain[0] * np.float32(amp_e)
        h += grain[1] * np.float32(amp_h)
        return _to_rgb(h, e)


def _wrap_window(bank: np.ndarray, y0: int, x0: int, t: int) -> np.ndarray:
    """The t x t window of a periodic 2-D bank at level-0 position (y0, x0), so it is seamless across tiles."""
    g_h, g_w = bank.shape
    oy, ox = y0 % g_h, x0 % g_w
    if oy + t <= g_h and ox + t <= g_w:
        return bank[oy : oy + t, ox : ox + t]
    return bank[((oy + np.arange(t)) % g_h)[:, None], ((ox + np.arange(t)) % g_w)[None, :]]


def _lr_to_full(value: np.ndarray | np.float32, t: int) -> np.ndarray:
    """A (t, t) float32 field from a low-resolution grid, or filled with a constant."""
    if np.ndim(value) == 0:
        return np.full((t, t), value, np.float32)
    return _upsample(value)


class _Tile:
    """One tile's origin, low-resolution sample positions and per-tile noise cache."""

    def __init__(self, x0: int, y0: int, t: int):
        self.x0, self.y0 = x0, y0
        self.xs = _lr_positions(x0, t)
        self.ys = _lr_positions(y0, t)
        self.cache: dict[str, np.ndarray] = {}


def _to_rgb(h: np.ndarray, e: np.ndarray) -> Image.Image:
    """Beer-Lambert colour of haematoxylin / eosin concentration maps via the lookup table."""
    h *= np.float32(_LUT_STEPS)
    e *= np.float32(_LUT_STEPS)
    qh = h.astype(np.int32)
    qe = e.astype(np.int32)
    np.clip(qh, 0, _LUT_NH - 1, out=qh)
    np.clip(qe, 0, _LUT_NE - 1, out=qe)
    qh *= _LUT_NE
    qh += qe
    rgbx = np.take(_LUT, qh)
    return Image.frombytes("RGB", (h.shape[1], h.shape[0]), rgbx, "raw", "RGBX")


# ---------------------------------------------------------------------------
# Writer


def _aperio_description(width: int, height: int, tile: int, quality: int, *, level_size: tuple[int, int] | None = None, props: str = "") -> str:
    head = f"{APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    return f"{head} JPEG/RGB Q={quality}{props}"


_THUMB_PX = 768  # the thumbnail's longer side is at most this


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average downsampling by an integer factor (partial edge blocks averaged as they are)."""
    return np.asarray(Image.fromarray(image).reduce(factor))


def write_synthetic_slide(
    path: str | Path,
    label_map: np.ndarray,
    *,
    cell_px: int,
    seed: int,
    mpp: float = 0.25,
    app_mag: int = 40,
    tile: int = 512,
    levels: int = 3,
    level_downsample: int = 4,
    jpeg_quality: int = 85,
    pen_strokes: Sequence[PenStroke] = (),
    defocus: Sequence[Defocus] = (),
) -> None:
    """Render `label_map` (class ids, one per cell of cell_px x cell_px level-0 pixels) as an Aperio-style SVS.

    Level 0 is `label_map.shape * cell_px` pixels (height = rows * cell_px);
    level k is ceil(size / level_downsample**k). Written atomically; the same
    arguments give the same bytes. `pen_strokes` are drawn in marker ink over the
    tissue, `defocus` rectangles rendered out of focus (pathgen.demo.artefacts).
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.size == 0:
        raise ValueError(f"label_map must be a non-empty 2-D array, got shape {label_map.shape}")
    if label_map.min() < 0 or label_map.max() > max(TEXTURES):
        raise ValueError(f"label_map holds class ids outside 0..{max(TEXTURES)}")
    if levels < 1 or level_downsample < 2:
        raise ValueError("levels must be >= 1 and level_downsample >= 2")
    if tile % 16 or tile % level_downsample:
        raise ValueError(f"tile {tile} must be a multiple of 16 and of level_downsample {level_downsample}")
    if cell_px < 1:
        raise ValueError("cell_px must be >= 1")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    label_map = label_map.astype(np.uint8)
    for stroke in pen_strokes:
        if stroke.ink not in artefacts.INKS:
            raise ValueError(f"pen stroke ink '{stroke.ink}' is not one of {sorted(artefacts.INKS)}")
    renderer = _SlideRenderer(label_map, cell_px, seed, tile, pen_strokes=pen_strokes, defocus=defocus)
    width, height = renderer.width, renderer.height
    ds = level_downsample
    sub = tile // ds
    level1 = np.zeros((renderer.tiles_down * sub, renderer.tiles_across * sub, 3), np.uint8)

    def tiles() -> Iterator[np.ndarray]:
        for ty in range(renderer.tiles_down):
            for tx in range(renderer.tiles_across):
                image = renderer.render(ty, tx)
                level1[ty * sub : (ty + 1) * sub, tx * sub : (tx + 1) * sub] = np.asarray(image.reduce(ds))
                yield np.asarray(image)

    props = f"|AppMag = {int(app_mag)}|MPP = {float(mpp)!r}"
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(jpeg_quality)},
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
        maxworkers=1,
    )
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
            tw.write(
                tiles(),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=_aperio_description(width, height, tile, jpeg_quality, props=props),
                software=SOFTWARE,
                **common,
            )
            chain = [level1[: -(-height // ds), : -(-width // ds)]]
            for _ in range(2, levels):
                chain.append(_reduce(chain[-1], ds))
            pyramid = chain if levels > 1 else []
            # thumbnail (page 1, stripped), as in Aperio files
            big = [p for p in chain if max(p.shape[:2]) >= _THUMB_PX]
            source = big[-1] if big else chain[0]
            factor = max(1, -(-max(source.shape[:2]) // _THUMB_PX))
            thumb = _reduce(source, factor) if factor > 1 else source
            tw.write(
                thumb,
                rowsperstrip=64,
                description=f"{APERIO_HEADER}\r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}",
                software=False,
                **common,
            )
            for level_img in pyramid:
                lh, lw = level_img.shape[:2]
                tw.write(
                    level_img,
                    tile=(tile, tile),
                    description=_aperio_description(width, height, tile, jpeg_quality, level_size=(lw, lh), props=props),
                    software=False,
                    **common,
                )


# ---------------------------------------------------------------------------
# Label maps


def rectangle_label_map(rows: int, cols: int, rect: tuple[int, int, int, int], cls: int) -> np.ndarray:
    """A rows x cols background map with cells [r0:r1, c0:c1] set to class `cls` (rect = (r0, c0, r1, c1))."""
    r0, c0, r1, c1 = rect
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise ValueError(f"rectangle {rect} does not fit a {rows} x {cols} map")
    out = np.zeros((rows, cols), np.uint8)
    out[r0:r1, c0:c1] = cls
    return out


def blob_label_map(rows: int, cols: int, classes: list[int], seed: int) -> np.ndarray:
    """An organic tissue outline (~55-70 % of the cells, background margins) split into regions of `classes`.

    The outline is a union of smoothed random blobs; regions are the argmax of
    smoothed noise fields, biased so each class gets a share (earlier classes
    larger). Deterministic from `seed`.
    """
    if rows < 2 or cols < 2:
        raise ValueError("blob_label_map needs at least 2 x 2 cells")
    if not classes or any(c not in TEXTURES for c in classes):
        raise ValueError(f"classes must be non-empty ids from {sorted(TEXTURES)}")
    rng = rng_for(seed, "blob-label-map")
    k = 4  # sub-cells per cell for a smoother outline
    hh, ww = rows * k, cols * k
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float64)
    yy, xx = (yy + 0.5) / hh, (xx + 0.5) / ww
    field = np.zeros((hh, ww))
    for _ in range(int(rng.integers(3, 6))):
        cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.75)
        sy, sx = rng.uniform(0.14, 0.26), rng.uniform(0.14, 0.26)
        field += rng.uniform(0.7, 1.0) * np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    noise = ndimage.gaussian_filter(rng.standard_normal((hh, ww)), sigma=1.2 * k, mode="reflect")
    field += 0.15 * noise / (noise.std() + 1e-12) * field.max()
    taper = np.minimum.reduce([yy, 1 - yy, xx, 1 - xx])
    field *= np.clip(taper * 6.0, 0.0, 1.0)
    cells = field.reshape(rows, k, cols, k).mean(axis=(1, 3))
    coverage = rng.uniform(0.60, 0.67)
    n_tissue = max(1, int(round(coverage * rows * cols)))
    ring_free = rows >= 5 and cols >= 5 and (rows - 2) * (cols - 2) >= 1.2 * n_tissue
    if ring_free:
        cells[[0, -1], :] = -np.inf
        cells[:, [0, -1]] = -np.inf
    order = np.argsort(-cells, axis=None, kind="stable")
    tissue = np.zeros(rows * cols, bool)
    tissue[order[:n_tissue]] = True
    tissue = ndimage.binary_fill_holes(tissue.reshape(rows, cols))

    weights = np.linspace(1.5, 1.0, len(classes))
    weights /= weights.sum()
    region_noise = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal((rows, cols)), sigma=max(1.0, min(rows, cols) / 6), mode="reflect") for _ in classes]
    )
    region_noise /= region_noise.std(axis=(1, 2), keepdims=True) + 1e-12
    bias = np.zeros(len(classes))
    n = int(tissue.sum())
    for _ in range(200):
        assign = np.argmax(region_noise + bias[:, None, None], axis=0)
        share = np.array([np.sum((assign == i) & tissue) for i in range(len(classes))]) / n
        if np.all(np.abs(share - weights) < 0.5 / n + 0.03):
            break
        bias += 0.5 * (weights - share)
    out = np.zeros((rows, cols), np.uint8)
    out[tissue] = np.asarray(classes, np.uint8)[assign[tissue]]
    return out


# ---------------------------------------------------------------------------
# The demo set


@dataclass(frozen=True)
class DemoSlide:
    """One synthetic demo slide: its id, manifest fields, tissue classes and report text (or None)."""

    slide_id: str
    tissue: str
    project: str
    classes: tuple[int, ...]
    report: str | None
    pen: str | None = None  # ink of a marker stroke across the tissue (artefacts.INKS), or none
    defocus: bool = False  # a block of tissue patches rendered out of focus


def demo_pen_stroke(label_map: np.ndarray, cell_px: int, ink: str) -> PenStroke | None:
    """A marker stroke over the demo tissue: along the longest run of tissue cells in the upper middle rows,
    over its middle 70 %, slightly tilted, 0.56 cells wide (None without tissue there)."""
    rows, _ = label_map.shape
    best = None  # (run length, -row, first column)
    for r in range(rows // 4, max(rows // 4 + 1, rows // 2 + 1)):
        tissue = np.concatenate(([False], label_map[r] > 0, [False]))
        edges = np.flatnonzero(np.diff(tissue.astype(np.int8)))
        for c0, c1 in zip(edges[::2].tolist(), edges[1::2].tolist()):
            cand = (c1 - c0, -r, c0)
            if best is None or cand > best:
                best = cand
    if best is None or best[0] < 2:
        return None
    n, r, c0 = best[0], -best[1], best[2]
    return PenStroke(ink, (c0 + 0.15 * n) * cell_px, (r + 0.3) * cell_px, (c0 + 0.85 * n) * cell_px, (r + 0.85) * cell_px,
                     half_width=0.28 * cell_px)


def demo_defocus(label_map: np.ndarray, cell_px: int, below_row: int = -1) -> Defocus | None:
    """An out-of-focus k x k block of tissue cells (k = max(2, round(rows / 6))), cell-aligned so whole patches
    fall in it: the all-tissue block below row `below_row` nearest the tissue's centre (None if none)."""
    rows, cols = label_map.shape
    k = max(2, round(rows / 6))
    tissue = label_map > 0
    if not tissue.any():
        return None
    cy, cx = (float(v.mean()) for v in np.nonzero(tissue))
    best = None
    for r in range(max(0, below_row + 1), rows - k + 1):
        for c in range(cols - k + 1):
            if tissue[r : r + k, c : c + k].all():
                d = (r + k / 2 - 0.5 - cy) ** 2 + (c + k / 2 - 0.5 - cx) ** 2
                if best is None or d < best[0]:
                    best = (d, r, c)
    if best is None:
        return None
    _, r, c = best
    return Defocus(c * cell_px, r * cell_px, (c + k) * cell_px, (r + k) * cell_px)


_LUNG_REPORT = """\
SPECIMEN: Right upper lobe, lobectomy.

GROSS DESCRIPTION: Received fresh and labeled "right upper lobe" is a lobectomy specimen measuring 16.5 x 11.0 x 4.2 cm. The pleural surface is tan-pink and smooth with focal puckering. Sectioning reveals a firm, tan-white, ill-defined mass measuring 3.4 x 2.9 x 2.5 cm, located 2.1 cm from the bronchial margin, with central yellow areas of necrosis. Representative sections are submitted in cassettes A1-A12.

MICROSCOPIC DESCRIPTION: Sections show invasive adenocarcinoma with a predominantly solid growth pattern, composed of sheets of large tumor cells with pleomorphic, hyperchromatic nuclei and prominent nucleoli. The tumor is surrounded by desmoplastic fibrous stroma and dense peritumoral lymphocytic infiltrates. Geographic tumor necrosis accounts for approximately 20% of the tumor. No visceral pleural invasion is identified. Six peribronchial lymph nodes are negative for carcinoma (0/6).

DIAGNOSIS: Right upper lobe, lobectomy: Invasive adenocarcinoma, solid predominant, poorly differentiated (G3), 3.4 cm, with tumor necrosis. Bronchial and vascular margins negative. pT2a pN0.
"""

_BREAST_REPORT = """\
SPECIMEN: Left breast, lumpectomy, and left axillary sentinel lymph node.

GROSS DESCRIPTION: The oriented lumpectomy measures 7.8 x 5.6 x 3.1 cm and consists of yellow lobulated adipose tissue with gray-white fibrous areas. Serial sectioning shows a firm, stellate, gray-white mass measuring 2.2 x 1.8 x 1.6 cm, located 0.9 cm from the closest (deep) margin. The specimen is entirely submitted in cassettes A1-A14.

MICROSCOPIC DESCRIPTION: The tumor is an invasive ductal carcinoma (no special type) forming solid nests and tubular glands with round lumens, set in a dense desmoplastic stroma and infiltrating the surrounding mature adipose tissue. Tubule formation score 2, nuclear pleomorphism score 3 (large, hyperchromatic nuclei), mitotic score 1. No lymphovascular invasion is identified. All margins are free of carcinoma. The sentinel lymph node is negative for carcinoma (0/1).

DIAGNOSIS: Left breast, lumpectomy: Invasive ductal carcinoma, Nottingham grade 2 (score 6/9), 2.2 cm. Margins negative. pT2 pN0(sn).
"""

DEMO_SLIDES: list[DemoSlide] = [
    DemoSlide("demo-lung-01", "lung", "TCGA-LUAD", (TUMOR, STROMA, LYMPHOCYTES, NECROSIS), _LUNG_REPORT, pen="green"),
    DemoSlide("demo-breast-01", "breast", "TCGA-BRCA", (TUMOR, STROMA, GLANDS, ADIPOSE), _BREAST_REPORT),
    DemoSlide("demo-colon-01", "colon", "TCGA-COAD", (GLANDS, STROMA, LYMPHOCYTES, TUMOR), None, pen="blue", defocus=True),
]

DEMO_CELL_PX = 672
DEMO_ROWS = 19
DEMO_COLS = 30
MANIFEST_COLUMNS = ("slide_id", "path", "tissue", "project", "mpp", "report")


def demo_grid(scale: float = 1.0) -> tuple[int, int]:
    """Label-map (rows, cols) of each demo slide at `scale` (cells of DEMO_CELL_PX level-0 pixels)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(4, math.ceil(DEMO_ROWS * scale - 1e-9)), max(6, math.ceil(DEMO_COLS * scale - 1e-9))


def _demo_levels(height: int, width: int, downsample: int = 4) -> int:
    """At least 3 levels; add more while the next level keeps >= 100 px on its short side."""
    levels = 3
    while min(height, width) / downsample**levels >= 100:
        levels += 1
    return levels


def demo_artefacts(spec: DemoSlide, label_map: np.ndarray) -> tuple[list[PenStroke], list[Defocus]]:
    """The pen strokes and out-of-focus boxes a demo slide carries (placed on its tissue, at any scale)."""
    pens, boxes = [], []
    stroke = demo_pen_stroke(label_map, DEMO_CELL_PX, spec.pen) if spec.pen else None
    if stroke is not None:
        pens.append(stroke)
    if spec.defocus:
        below = int(max(stroke.y0, stroke.y1) + stroke.half_width) // DEMO_CELL_PX if stroke is not None else -1
        box = demo_defocus(label_map, DEMO_CELL_PX, below_row=below)
        if box is not None:
            boxes.append(box)
    return pens, boxes


def make_demo(root: Path, *, seed: int = 0, scale: float = 1.0) -> Path:
    """Write the demo slides, reports and `data/slides.tsv` under `root`; return the manifest path.

    Slides go to root/data/demo/{slide_id}.svs, reports to
    root/data/demo/reports/{slide_id}.txt; manifest paths are relative to root.
    Same seed and scale give identical bytes in every file.
    """
    root = Path(root)
    rows, cols = demo_grid(scale)
    lines = ["\t".join(MANIFEST_COLUMNS)]
    for spec in DEMO_SLIDES:
        label_map = blob_label_map(rows, cols, list(spec.classes), seed=derive_seed(seed, spec.slide_id, "labels"))
        rel_slide = f"data/demo/{spec.slide_id}.svs"
        pens, boxes = demo_artefacts(spec, label_map)
        write_synthetic_slide(
            root / rel_slide,
            label_map,
            cell_px=DEMO_CELL_PX,
            seed=derive_seed(seed, spec.slide_id, "texture"),
            levels=_demo_levels(rows * DEMO_CELL_PX, cols * DEMO_CELL_PX),
            pen_strokes=pens,
            defocus=boxes,
        )
        rel_report = ""
        if spec.report is not None:
            rel_report = f"data/demo/reports/{spec.slide_id}.txt"
            write_text(spec.report, root / rel_report)
        lines.append("\t".join([spec.slide_id, rel_slide, spec.tissue, spec.project, "", rel_report]))
    manifest = root / "data" / "slides.tsv"
    write_text("\n".join(lines) + "\n", manifest)
    return manifest


def texture_patches(per_class: int, seed: int, size: int = 672) -> list[tuple[int, Image.Image]]:
    """`per_class` level-0 patches of each texture class, as (class id, RGB image), deterministic."""
    classes = np.array(sorted(TEXTURES), dtype=np.uint8)
    label_map = np.repeat(classes[None, :], per_class, axis=0)
    renderer = _SlideRenderer(label_map, size, seed, size)
    return [(int(classes[tx]), renderer.render(ty, tx)) for ty in range(per_class) for tx in range(len(classes))]
