"""Whole-slide image access through OpenSlide, with failures named by slide.

OpenSlide errors are sticky per handle and their messages rarely say which
file failed; everything here re-raises them as `SlideError` naming the slide
id and path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from pathgen.errors import SlideError


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

    def read_patch(self, x: int, y: int, level: int, read_size: int, out_size: int) -> Image.Image:
        """One patch as stored and embedded: read at `level`, resized to `out_size` when they differ."""
        image = self.read_region(x, y, level, read_size, read_size)
        if read_size != out_size:
            image = image.resize((out_size, out_size), Image.Resampling.LANCZOS)
        return image
