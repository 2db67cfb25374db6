"""tile: segment a slide's tissue and lay a non-overlapping patch grid over it.

Paper, appendix C.1.1: crops of 672×672 px at the highest magnification
(`tile.mode: level0`). `tile.mode: mpp` instead fixes the physical size
(patch_size px at target_mpp), reading from the best pyramid level.

The tissue mask is computed on a thumbnail at exactly `tile.mask.downsample`
(32: one mask pixel per 32 x 32 level-0 pixels, 21 x 21 mask pixels per 672 px
patch), whatever levels the slide has: `Slide.read_thumbnail` reduces the best
level at or above that resolution to it, block by block, so a slide with only
1x and 4x levels costs a few blocks of memory, not its whole 4x level. (Before,
the mask was the best level itself, e.g. 16x on slides with 1x/4x/16x/64x
levels.) `mask_level` in the info is the level read, `thumbnail_scale` the
exact level-0 px per thumbnail px; `blur_radius`, `close_radius` and the
thumbnail picture are in these thumbnail pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from pathgen.errors import ConfigError, SlideError
from pathgen.store.io import write_json, write_parquet, write_png
from pathgen.store.status import placeholder_picture
from pathgen.wsi.slide import Slide
from pathgen.wsi.tissue import mask_outline, tissue_mask

GRID_SCHEMA = {
    "x": pl.Int64,  # level-0 top-left
    "y": pl.Int64,
    "size": pl.Int32,  # level-0 extent of the patch
    "level": pl.Int32,  # pyramid level the patch is read from
    "read_size": pl.Int32,  # px read at `level`
    "out_size": pl.Int32,  # px of the patch as stored and embedded
    "tissue": pl.Float32,  # tissue fraction of the patch footprint
}

MASK_COLOUR = (0, 170, 60)
GRID_COLOUR = (40, 90, 220)


def patch_geometry(slide: Slide, params: dict[str, Any]) -> tuple[int, int, int, int]:
    """(level-0 size, read level, read size, output size) of one patch for this slide."""
    out = params["patch_size"]
    if params["mode"] == "level0":
        return out, 0, out, out
    target = params["target_mpp"]
    if target is None:
        raise ConfigError("params.yaml: tile.mode is 'mpp' but tile.target_mpp is null")
    mpp = slide.mpp
    if mpp is None:
        raise SlideError(
            f"slide '{slide.slide_id}' ({slide.path}): no mpp in the slide and none in the manifest; "
            "tile.mode 'mpp' needs one (fill the manifest's mpp column)"
        )
    size0 = max(1, round(out * target / mpp))
    level = slide.best_level_for(size0 / out)
    read_size = max(1, round(size0 / slide.level_downsamples[level]))
    return size0, level, read_size, out


def tissue_fractions(mask: np.ndarray, scale: tuple[float, float], xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """Fraction of mask pixels inside each level-0 square (x, y, size), via an integral image."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.round(xs / scale[0]).astype(int), 0, w)
    x1 = np.clip(np.round((xs + size) / scale[0]).astype(int), 0, w)
    y0 = np.clip(np.round(ys / scale[1]).astype(int), 0, h)
    y1 = np.clip(np.round((ys + size) / scale[1]).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def tile_slide(slide: Slide, params: dict[str, Any]) -> tuple[pl.DataFrame, Image.Image, dict[str, Any]]:
    """Segment `slide` and grid it; returns (grid, thumbnail with mask and grid, slide info).

    `params` is params.yaml's `tile` section.
    """
    size0, level, read_size, out_size = patch_geometry(slide, params)
    thumb, mask_level = slide.read_thumbnail(params["mask"]["downsample"])
    width, height = slide.dimensions
    scale = (width / thumb.width, height / thumb.height)
    min_object_px = params["mask"]["min_object_area"] * size0 * size0 / (scale[0] * scale[1])
    mask = tissue_mask(thumb, params["mask"], min_object_px)

    ys, xs = np.mgrid[0 : height - size0 + 1 : size0, 0 : width - size0 + 1 : size0]
    xs, ys = xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)
    fractions = tissue_fractions(mask, scale, xs, ys, size0)
    keep = fractions >= params["min_tissue_fraction"]
    if params["min_tissue_fraction"] == 0:
        keep &= fractions > 0
    grid = pl.DataFrame(
        {
            "x": xs[keep],
            "y": ys[keep],
            "size": np.full(keep.sum(), size0),
            "level": np.full(keep.sum(), level),
            "read_size": np.full(keep.sum(), read_size),
            "out_size": np.full(keep.sum(), out_size),
            "tissue": fractions[keep],
        },
        schema=GRID_SCHEMA,
    )

    info = {
        "slide_id": slide.slide_id,
        "file": slide.path.name,
        "vendor": slide.vendor,
        "width": width,
        "height": height,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [round(d, 6) for d in slide.level_downsamples],
        "mpp": slide.mpp,
        "objective_power": slide.objective_power,
        "mask_level": mask_level,
        "thumbnail_scale": [round(scale[0], 6), round(scale[1], 6)],
        "tissue_area_fraction": round(float(mask.mean()), 6),
        "patch": {"size": size0, "level": level, "read_size": read_size, "out_size": out_size},
        "grid_cells": int(xs.size),
        "patches": int(keep.sum()),
    }
    return grid, draw_thumbnail(thumb, mask, grid, scale), info


def draw_thumbnail(thumb: Image.Image, mask: np.ndarray, grid: pl.DataFrame, scale: tuple[float, float]) -> Image.Image:
    """The thumbnail with the tissue outline and the kept patches' borders drawn on it."""
    pixels = np.asarray(thumb.convert("RGB")).copy()
    for x, y, size in grid.select("x", "y", "size").iter_rows():
        x0, y0 = int(x / scale[0]), int(y / scale[1])
        x1 = min(int((x + size) / scale[0]), pixels.shape[1] - 1)
        y1 = min(int((y + size) / scale[1]), pixels.shape[0] - 1)
        pixels[y0, x0 : x1 + 1] = GRID_COLOUR
        pixels[y1, x0 : x1 + 1] = GRID_COLOUR
        pixels[y0 : y1 + 1, x0] = GRID_COLOUR
        pixels[y0 : y1 + 1, x1] = GRID_COLOUR
    outline = mask_outline(mask)
    outline |= np.roll(outline, 1, axis=0) | np.roll(outline, 1, axis=1)
    pixels[outline] = MASK_COLOUR
    return Image.fromarray(pixels)


def run_tile(wsi: str | Path, slide_id: str, params: dict[str, Any], grid_out: str | Path,
             thumb_out: str | Path, info_out: str | Path, mpp_override: float | None = None) -> pl.DataFrame:
    """The tile step: read the slide, write grid parquet, thumbnail PNG and info JSON."""
    with Slide(wsi, slide_id, mpp_override) as slide:
        grid, thumb, info = tile_slide(slide, params)
    write_png(thumb, thumb_out)
    write_json(info, info_out)
    write_parquet(grid, grid_out)
    return grid


def write_quarantined_tile(slide_id: str, reason: str, grid_out: str | Path, thumb_out: str | Path,
                           info_out: str | Path) -> None:
    """The tile outputs of a quarantined slide: an empty grid, a placeholder thumbnail, info naming the reason."""
    write_png(placeholder_picture(), thumb_out)
    write_json({"slide_id": slide_id, "quarantined": reason, "patches": 0, "grid_cells": 0, "mpp": None}, info_out)
    write_parquet(pl.DataFrame(schema=GRID_SCHEMA), grid_out)
