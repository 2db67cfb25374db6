"""A large, mostly empty synthetic slide, written in seconds: for memory tests and benchmarks of the tile step.

`write_large_slide` writes an Aperio-style two-level SVS (the layout of
`pathgen.demo.slides`: page 0 level 0 tiled, page 1 a stripped thumbnail,
page 2 level 1 tiled, `level_downsample` times smaller), like a TCGA slide
scanned with only a 1x and a 4x level. Glass everywhere except rectangles of
a tissue-coloured texture (pink with purple nuclei, periodic in 512 px at
level 0; level 1 holds its box-reduced copy, so the levels agree).

It is fast because almost every tile is the same: each distinct tile (glass,
tissue, the few tissue-edge cuts) is JPEG-encoded once, and the tile
iterator hands tifffile those pre-compressed bytes (tifffile writes bytes
items as they are; they must match the page's compression settings, which
they do since they are made by tifffile itself with the same settings). A
100,000 x 80,000 px slide takes under 2 s and ~230 MB. The same
arguments give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pathgen.demo.slides import APERIO_HEADER, SOFTWARE, _aperio_description
from pathgen.store.io import atomic_path

GLASS = (243, 243, 243)
PERIOD = 512  # level-0 texture period
_THUMB_PX = 768

Rect = tuple[int, int, int, int]  # level-0 (x0, y0, x1, y1), x1/y1 exclusive


def tissue_texture(seed: int = 0) -> np.ndarray:
    """The PERIOD x PERIOD level-0 tissue texture: eosin pink with haematoxylin nuclei, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:PERIOD, :PERIOD]
    pixels = np.empty((PERIOD, PERIOD, 3), np.float64)
    pixels[:] = (226, 140, 184)
    nuclei = np.zeros((PERIOD, PERIOD), bool)
    for cy, cx, r in zip(rng.integers(0, PERIOD, 90), rng.integers(0, PERIOD, 90), rng.integers(6, 13, 90)):
        dy = (yy - cy + PERIOD // 2) % PERIOD - PERIOD // 2  # periodic distance, so tiles join seamlessly
        dx = (xx - cx + PERIOD // 2) % PERIOD - PERIOD // 2
        nuclei |= dy * dy + dx * dx <= r * r
    pixels[nuclei] = (112, 60, 150)
    pixels += rng.normal(0, 6, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _write_args(jpeg_quality: int, mpp: float) -> dict:
    return dict(photometric="rgb", compression="jpeg", compressionargs={"level": int(jpeg_quality)},
                resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None, maxworkers=1)


def _encode(tile: np.ndarray, args: dict) -> bytes:
    """`tile` compressed exactly as tifffile compresses a tile of a page written with `args`."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(tile, tile=tile.shape[:2], **args)
    buf.seek(0)
    with tifffile.TiffFile(buf) as tf:
        page = tf.pages[0]
        tf.filehandle.seek(page.dataoffsets[0])
        return tf.filehandle.read(page.databytecounts[0])


def write_large_slide(
    path: str | Path,
    width: int = 100_000,
    height: int = 80_000,
    tissue: Sequence[Rect] = ((43008, 21504, 64512, 43008),),
    *,
    tile: int = 512,
    level_downsample: int = 4,
    mpp: float = 0.25,
    app_mag: int = 40,
    jpeg_quality: int = 85,
    seed: int = 0,
) -> None:
    """Write a two-level Aperio-style slide of `width` x `height` px: glass with `tissue` rectangles.

    Rectangle corners must be multiples of `level_downsample` (so level 1 has
    them at whole pixels); `tile` a multiple of PERIOD. Written atomically.
    """
    ds = level_downsample
    if tile % PERIOD or PERIOD % ds:
        raise ValueError(f"tile {tile} must be a multiple of {PERIOD}, and {PERIOD} of level_downsample {ds}")
    for rect in tissue:
        x0, y0, x1, y1 = rect
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height) or any(v % ds for v in rect):
            raise ValueError(f"tissue rectangle {rect} must lie in the slide and have corners divisible by {ds}")
    args = _write_args(jpeg_quality, mpp)
    texture0 = tissue_texture(seed)
    textures = [  # tile-sized windows of the periodic texture at each level (tile origins are multiples of the period)
        np.tile(texture0, (tile // PERIOD, tile // PERIOD, 1)),
        np.tile(np.asarray(Image.fromarray(texture0).reduce(ds)), (tile * ds // PERIOD, tile * ds // PERIOD, 1)),
    ]
    sizes = [(width, height), (-(-width // ds), -(-height // ds))]
    rects = [list(tissue), [tuple(v // ds for v in rect) for rect in tissue]]
    cache: dict[tuple, bytes] = {}

    def tile_bytes(level: int, ty: int, tx: int) -> bytes:
        ox, oy = tx * tile, ty * tile
        cuts = []
        for x0, y0, x1, y1 in rects[level]:
            a0, a1 = max(x0 - ox, 0), min(x1 - ox, tile)
            b0, b1 = max(y0 - oy, 0), min(y1 - oy, tile)
            if a0 < a1 and b0 < b1:
                cuts.append((a0, a1, b0, b1))
        key = (level, tuple(cuts))
        if key not in cache:
            pixels = np.empty((tile, tile, 3), np.uint8)
            pixels[:] = GLASS
            for a0, a1, b0, b1 in cuts:
                pixels[b0:b1, a0:a1] = textures[level][b0:b1, a0:a1]
            cache[key] = _encode(pixels, args)
        return cache[key]

    def tiles(level: int) -> Iterator[bytes]:
        w, h = sizes[level]
        for ty in range(-(-h // tile)):
            for tx in range(-(-w // tile)):
                yield tile_bytes(level, ty, tx)

    props = f"|AppMag = {int(app_mag)}|MPP = {float(mpp)!r}"
    # the thumbnail (an associated image, never a level): glass with the rectangles in the texture's mean colour
    factor = -(-max(width, height) // _THUMB_PX)
    tw_, th_ = -(-width // factor), -(-height // factor)
    thumb = np.empty((th_, tw_, 3), np.uint8)
    thumb[:] = GLASS
    mean = np.rint(texture0.reshape(-1, 3).mean(0)).astype(np.uint8)
    for x0, y0, x1, y1 in tissue:
        thumb[y0 // factor : -(-y1 // factor), x0 // factor : -(-x1 // factor)] = mean
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
            tw.write(tiles(0), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                     description=_aperio_description(width, height, tile, jpeg_quality, props=props),
                     software=SOFTWARE, **args)
            tw.write(thumb, rowsperstrip=64, software=False,
                     description=f"{APERIO_HEADER}\r\n{width}x{height} -> {tw_}x{th_} - {props}", **args)
            lw, lh = sizes[1]
            tw.write(tiles(1), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), software=False,
                     description=_aperio_description(width, height, tile, jpeg_quality, level_size=(lw, lh),
                                                     props=props), **args)
