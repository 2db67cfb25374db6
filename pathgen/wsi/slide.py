"""Whole-slide image access through OpenSlide, with failures named by slide.

OpenSlide errors are sticky per handle and their messages rarely say which
file failed; everything here re-raises them as `SlideError` naming the slide
id and path.

Thumbnails (`Slide.read_thumbnail`) are made at the requested downsample, not
at whatever level the pyramid happens to have, and in bounded memory: the
best level at or above that resolution is read in blocks of at most
THUMBNAIL_BLOCK_PX pixels, each block composited onto white and reduced on its
own, and the small results pasted together. A 100,000 x 80,000 px slide with
only 1x and 4x levels is never held as its 25,000 x 20,000 px level (several
GB of RGBA and RGB copies); peak memory is a few blocks plus the thumbnail.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from pathgen.errors import SlideError

THUMBNAIL_BLOCK_PX = 1 << 22  # pixels per read_region of a thumbnail (16 MB of RGBA)
WHOLE_LEVEL_PX = 1 << 25  # a level already at the thumbnail's resolution is read whole up to this size


class Slide:
    """An open whole-slide image: levels, resolution and region reads."""

    def __init__(self, path: str | Path, slide_id: str, mpp_override: float | None = None):
        self.path = Path(path)
        self.slide_id = slide_id
        self._where = f"slide '{slide_id}' ({self.path})"
        if not self.path.is_file():
            raise SlideError(f"{self._where}: file not found")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self._where}: not a slide format OpenSlide can read") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{self._where}: cannot open: {exc}") from None
        self.mpp_override = mpp_override

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def vendor(self) -> str | None:
        return self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR)

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel: the manifest's override, else the slide's own, else None."""
        if self.mpp_override is not None:
            return self.mpp_override
        props = self._osr.properties
        values = [props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)]
        try:
            mpps = [float(v) for v in values if v is not None]
        except ValueError:
            return None
        mpps = [m for m in mpps if math.isfinite(m) and m > 0]
        return float(np.mean(mpps)) if mpps else None

    @property
    def objective_power(self) -> float | None:
        value = self._osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def best_level_for(self, downsample: float) -> int:
        """The highest-resolution level whose downsample is at most `downsample` (+1 %)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB region at `level` whose top-left is (x, y) in level-0 pixels; white where transparent."""
        try:
            rgba = self._osr.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self._where}: cannot read region at ({x}, {y}) level {level}: {exc}") from None
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background

    def read_level(self, level: int) -> Image.Image:
        """A whole level as one RGB image (use only on low-resolution levels)."""
        width, height = self.level_dimensions[level]
        return self.read_region(0, 0, level, width, height)

    def read_thumbnail(self, downsample: float, block_px: int = THUMBNAIL_BLOCK_PX,
                       whole_px: int = WHOLE_LEVEL_PX) -> tuple[Image.Image, int]:
        """The slide as RGB at `downsample` level-0 px per pixel (white where transparent), and the level read.

        The level read is `best_level_for(downsample)`; f = downsample / its downsample.
        * f within 1 % of 1: that level as it is. Read whole when it has at most `whole_px`
          pixels (byte-identical to `read_level`), else in blocks of at most `block_px`
          pixels, which equal the whole read when the level's downsample is an integer.
        * f within 1 % of an integer k > 1: Image.reduce(k) of the level (box average of k x k
          pixels; ceil(size / k) pixels, the last row and column averaging what is there),
          computed block by block on blocks whose sides are multiples of k, so each block
          reduces to whole thumbnail pixels and the result equals reducing the whole level.
        * otherwise: a box-filter resize of the level to round(size / f), strip by strip
          (each strip read with the filter's support around it, resized through PIL's `box`
          so every output pixel covers exactly its share of the level).
        The thumbnail's own size gives its exact scale: level-0 width / thumbnail width.
        Blocks whose level-0 origin falls between two level pixels (levels whose downsample
        is not an integer) are resampled by OpenSlide by that fraction, under 1/8 level pixel
        for a 4x level, so such slides agree with a whole-level read only up to that shift.
        """
        if not downsample > 0:
            raise ValueError(f"thumbnail downsample must be > 0, got {downsample}")
        level = self.best_level_for(downsample)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        factor = downsample / ds
        k = round(factor)
        if k >= 1 and abs(factor - k) <= 0.01 * factor:
            if k == 1 and lw * lh <= whole_px:
                return self.read_level(level), level
            return self._reduced_level(level, k, block_px), level
        return self._resized_level(level, factor, block_px), level

    def _level_block(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        """RGB block of `level` whose top-left is (x, y) in that level's pixels."""
        ds = self.level_downsamples[level]
        return self.read_region(round(x * ds), round(y * ds), level, width, height)

    def _tile_size(self, level: int) -> tuple[int, int] | None:
        """The level's stored tile (width, height), where OpenSlide reports it."""
        props = self._osr.properties
        try:
            size = int(props[f"openslide.level[{level}].tile-width"]), int(props[f"openslide.level[{level}].tile-height"])
        except (KeyError, ValueError):
            return None
        return size if min(size) > 0 else None

    def _reduced_level(self, level: int, k: int, block_px: int) -> Image.Image:
        lw, lh = self.level_dimensions[level]
        out = Image.new("RGB", (-(-lw // k), -(-lh // k)), (255, 255, 255))
        # Blocks of whole k x k cells. Where whole stored tiles fit, a block is one row of tiles
        # (as many as fit), so each tile is decoded once (OpenSlide's tile cache is smaller than a
        # row of tiles of a large level); else full-width strips, or columns too when k rows are too many.
        tile = self._tile_size(level)
        unit = (math.lcm(k, tile[0]) // k, math.lcm(k, tile[1]) // k) if tile else None  # in thumbnail px
        if unit and unit[0] * unit[1] * k * k <= block_px:
            rows = unit[1]
            cols = min(-(-out.width // unit[0]), block_px // (unit[0] * unit[1] * k * k)) * unit[0]
        else:
            cells = max(1, block_px // (k * k))
            cols = min(out.width, cells)
            rows = max(1, cells // cols)
        for ty in range(0, out.height, rows):
            for tx in range(0, out.width, cols):
                x, y = tx * k, ty * k
                block = self._level_block(level, x, y, min(cols * k, lw - x), min(rows * k, lh - y))
                out.paste(block.reduce(k) if k > 1 else block, (tx, ty))
        return out

    def _resized_level(self, level: int, factor: float, block_px: int) -> Image.Image:
        lw, lh = self.level_dimensions[level]
        ow, oh = max(1, round(lw / factor)), max(1, round(lh / factor))
        sy = lh / oh  # level rows per thumbnail row
        margin = math.ceil(sy / 2) + 2  # the box filter's support around a strip, and rounding
        rows = max(1, int((block_px / lw - 2 * margin) / sy))
        out = Image.new("RGB", (ow, oh), (255, 255, 255))
        for j0 in range(0, oh, rows):
            j1 = min(oh, j0 + rows)
            y0, y1 = max(0, math.floor(j0 * sy) - margin), min(lh, math.ceil(j1 * sy) + margin)
            strip = self._level_block(level, 0, y0, lw, y1 - y0)
            box = (0.0, j0 * sy - y0, float(lw), j1 * sy - y0)
            out.paste(strip.resize((ow, j1 - j0), Image.Resampling.BOX, box=box), (0, j0))
        return out

    def read_patch(self, x: int, y: int, level: int, read_size: int, out_size: int) -> Image.Image:
        """One patch as stored and embedded: read at `level`, resized to `out_size` when they differ."""
        image = self.read_region(x, y, level, read_size, read_size)
        if read_size != out_size:
            image = image.resize((out_size, out_size), Image.Resampling.LANCZOS)
        return image
