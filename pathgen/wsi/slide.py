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

import io
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
import tifffile
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
        self._tiles: TileReader | None | bool = False  # False: not probed yet

    def close(self) -> None:
        if self._tiles:
            self._tiles.close()
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

    def read_patch_scaled(self, x: int, y: int, level: int, read_size: int, size: int) -> Image.Image | None:
        """The patch `read_patch` would read, as an RGB `size` x `size` image decoded from the stored JPEG tiles.

        For tiled-JPEG TIFF levels (Aperio layout), through `TileReader`: tiles are decoded at the
        largest libjpeg DCT scale (1/2, 1/4, 1/8) that keeps at least `size` px and leaves an integer
        factor, which an exact box filter then reduces (672 -> 336: decoded at 1/2, nothing left);
        where no scale leaves one, at the largest that keeps `size` px, then resized bicubically. None where the
        tiles cannot serve the patch (another format or compression, a level OpenSlide composes
        itself, a region off the image or over a missing tile): use `read_patch` then.
        """
        if self._tiles is False:
            self._tiles = TileReader.open(self)
        if self._tiles is None:
            return None
        return self._tiles.read_patch(x, y, level, read_size, size)


# Vendors whose tiled pages OpenSlide shows as they are stored (no overlaps, no sparse-tile fills).
_TILE_VENDORS = {"aperio", "generic-tiff"}
_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
_DCT_SCALES = (8, 4, 2, 1)


class TileReader:
    """Patches of a tiled-JPEG TIFF read by decoding its stored tiles directly.

    tifffile gives the layout (tile offsets and byte counts, JPEGTables); each tile's bytes are read
    once with `os.pread` and decoded by PIL (libjpeg-turbo), optionally at a reduced DCT scale
    (`Image.draft`), which is the cheap way to the model's input size: a 672 px patch for a 336 px
    model decodes at 1/2 scale. Decoded tiles are kept in a small LRU cache, since neighbouring
    patches share tiles. At full scale the pixels are OpenSlide's own (both decode the same JPEG
    bitstream with libjpeg); each level is checked against OpenSlide on one tile before its first
    use, and a level that disagrees (e.g. a colour space libjpeg would guess differently) is left
    to OpenSlide.
    """

    CACHE_PIXELS = 16 * 1024 * 1024  # decoded tile pixels kept (about 48 MB of RGB)
    MAX_MEAN_DIFF = 1.0  # mean |tile decode - OpenSlide| (0-255) accepted by the per-level check

    def __init__(self, slide: Slide, tif: tifffile.TiffFile, pages: dict[int, tifffile.TiffPage]):
        self._slide, self._tif, self._pages = slide, tif, pages
        self._where = slide._where
        self._fd = os.open(slide.path, os.O_RDONLY)
        self._checked: dict[int, bool] = {}
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached_pixels = 0

    @classmethod
    def open(cls, slide: Slide) -> "TileReader | None":
        """A reader for the slide's tiled-JPEG levels, or None when no level can be read by tiles."""
        if slide.vendor not in _TILE_VENDORS:
            return None
        try:
            tif = tifffile.TiffFile(slide.path)
        except Exception:  # not a TIFF tifffile parses: OpenSlide reads it
            return None
        pages: dict[int, tifffile.TiffPage] = {}
        for level, (width, height) in enumerate(slide.level_dimensions):
            for page in tif.pages:
                if (page.imagewidth, page.imagelength) == (width, height) and cls._readable(page):
                    pages[level] = page
                    break
        if not pages:
            tif.close()
            return None
        return cls(slide, tif, pages)

    @staticmethod
    def _readable(page: tifffile.TiffPage) -> bool:
        return (page.is_tiled and page.compression == _JPEG and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
                and page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == 1
                and page.imagedepth == 1 and page.tiledepth == 1)

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)
        self._cache.clear()

    def _tile(self, page: tifffile.TiffPage, index: int, scale: int) -> np.ndarray | None:
        """Tile `index` of `page` decoded at 1/`scale` (RGB uint8), None for a missing (sparse) tile."""
        key = (page.index, index, scale)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:
            return None
        try:
            data = os.pread(self._fd, count, offset)
            if len(data) != count:
                raise OSError(f"tile {index} of TIFF page {page.index} ends past the end of the file")
            tables = page.jpegtables
            if tables:  # abbreviated tile stream: the tables' SOI..tables, then the tile after its SOI
                data = bytes(tables[:-2]) + data[2:]
            image = Image.open(io.BytesIO(data), formats=["JPEG"])
            th, tw = page.tilelength, page.tilewidth
            if scale > 1:
                image.draft("RGB", (tw // scale, th // scale))
            if image.size != (tw // scale, th // scale):
                raise OSError(f"tile {index} of TIFF page {page.index} decodes to {image.size}, "
                              f"not {(tw // scale, th // scale)}")
            tile = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for broken JPEG data
            raise SlideError(f"{self._where}: cannot decode tile {index} of TIFF page {page.index}: {exc}") from None
        self._cache[key] = tile
        self._cached_pixels += tile.shape[0] * tile.shape[1]
        while self._cached_pixels > self.CACHE_PIXELS and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_pixels -= old.shape[0] * old.shape[1]
        return tile

    def region(self, level: int, left: int, top: int, width: int, height: int, scale: int = 1) -> np.ndarray | None:
        """RGB uint8 (height/scale, width/scale, 3) of `level` at level coordinates, decoded at 1/`scale`.

        `left`, `top`, `width` and `height` must be multiples of `scale`. None when the region leaves
        the image or covers a missing tile.
        """
        page = self._pages[level]
        if left < 0 or top < 0 or left + width > page.imagewidth or top + height > page.imagelength:
            return None
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((height // scale, width // scale, 3), np.uint8)
        for ty in range(top // th, (top + height - 1) // th + 1):
            for tx in range(left // tw, (left + width - 1) // tw + 1):
                tile = self._tile(page, ty * across + tx, scale)
                if tile is None:
                    return None
                # the part of this tile inside the region, in level pixels
                x0, x1 = max(left, tx * tw), min(left + width, (tx + 1) * tw)
                y0, y1 = max(top, ty * th), min(top + height, (ty + 1) * th)
                out[(y0 - top) // scale:(y1 - top) // scale, (x0 - left) // scale:(x1 - left) // scale] = \
                    tile[(y0 - ty * th) // scale:(y1 - ty * th) // scale, (x0 - tx * tw) // scale:(x1 - tx * tw) // scale]
        return out

    def _level_ok(self, level: int) -> bool:
        """Whether the tiles of `level` decode to OpenSlide's pixels (checked once, on its largest full tile)."""
        if level not in self._checked:
            page = self._pages[level]
            tw, th = page.tilewidth, page.tilelength
            across, down = page.imagewidth // tw, page.imagelength // th
            full = [ty * (-(-page.imagewidth // tw)) + tx for ty in range(down) for tx in range(across)]
            ok = False
            if full:
                counts = np.asarray(page.databytecounts)[full]
                index = full[int(np.argmax(counts))]  # the most detailed tile: a colour mix-up shows there
                ty, tx = divmod(index, -(-page.imagewidth // tw))
                mine = self.region(level, tx * tw, ty * th, tw, th)
                if mine is not None:
                    ds = self._slide.level_downsamples[level]
                    theirs = np.asarray(self._slide.read_region(round(tx * tw * ds), round(ty * th * ds), level, tw, th))
                    ok = float(np.abs(mine.astype(np.int16) - theirs).mean()) <= self.MAX_MEAN_DIFF
            self._checked[level] = ok
        return self._checked[level]

    def read_patch(self, x: int, y: int, level: int, read_size: int, size: int) -> Image.Image | None:
        """See `Slide.read_patch_scaled`."""
        if level not in self._pages:
            return None
        ds = self._slide.level_downsamples[level]
        left, top = x / ds, y / ds
        if left != int(left) or top != int(top):  # OpenSlide would resample: not a stored pixel grid
            return None
        left, top = int(left), int(top)
        page = self._pages[level]
        usable = [s for s in _DCT_SCALES if s == 1 or (
            read_size // s >= size and read_size % s == 0 and left % s == 0 and top % s == 0
            and page.tilewidth % s == 0 and page.tilelength % s == 0)]
        # the largest DCT scale that leaves an exact integer reduction, else the largest one
        scale = next((s for s in usable if (read_size // s) % size == 0), usable[0])
        if not self._level_ok(level):
            return None
        pixels = self.region(level, left, top, read_size, read_size, scale)
        if pixels is None:
            return None
        image = Image.fromarray(pixels)
        side = read_size // scale
        if side != size:
            if side % size == 0:
                image = image.reduce(side // size)
            else:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
        return image
