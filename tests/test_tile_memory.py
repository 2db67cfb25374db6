"""Issue 12: the tile step reads its mask thumbnail in bounded memory (real OpenSlide, real `pathgen tile`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import tifffile
from conftest import BIN, ROOT, TEST_SCALE
from PIL import Image

from pathgen.demo.large_slide import GLASS, write_large_slide
from pathgen.demo.slides import DEMO_SLIDES, make_demo
from pathgen.errors import SlideError
from pathgen.wsi.slide import Slide

PATCH = 672
# 32 x 32 patches of tissue, corners on the 672 px grid (and divisible by 4 for level 1)
TISSUE = (64 * PATCH, 32 * PATCH, 96 * PATCH, 64 * PATCH)
LIMIT_KB = 1536 * 1024  # 1.5 GB

# Runs a command and prints its own peak RSS. A fresh, small process does the measuring: a child's
# ru_maxrss starts from its parent's high-water mark when it is forked and exec'd (Linux keeps the
# old memory's peak across exec), so measured straight from pytest it would include pytest's own memory.
MAXRSS = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


@pytest.fixture(scope="module")
def demo_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, scale=TEST_SCALE)
    return [root / f"data/demo/{spec.slide_id}.svs" for spec in DEMO_SLIDES]


def test_a_thumbnail_at_a_levels_downsample_is_that_level_byte_for_byte(demo_slides):
    for path in demo_slides:
        with Slide(path, path.stem) as slide:
            assert slide.level_downsamples == (1.0, 4.0, 16.0)
            for level in (0, 1, 2) if path == demo_slides[0] else (1, 2):  # level 0 (35 Mpx) once
                ds = slide.level_downsamples[level]
                whole = slide.read_level(level).tobytes()
                for ask in (ds, ds * 1.009):  # within 1 %: the level as it is
                    thumb, got = slide.read_thumbnail(ask)
                    assert got == level and thumb.tobytes() == whole
                strips, _ = slide.read_thumbnail(ds, block_px=7_000 * 4 ** (2 - level), whole_px=0)  # in blocks
                assert strips.tobytes() == whole, (path.stem, level)


def test_a_reduced_thumbnail_is_the_whole_level_reduced_whatever_the_blocks(demo_slides):
    for path in demo_slides[:2]:
        with Slide(path, path.stem) as slide:
            expected = slide.read_level(2).reduce(2)  # the demo's mask thumbnail: 32 from the 16x level
            for block_px in (1 << 22, 5_000, 300):  # one block, strips, columns too
                thumb, level = slide.read_thumbnail(32, block_px=block_px)
                assert level == 2 and thumb.size == (231, 147)
                assert thumb.tobytes() == expected.tobytes(), block_px
            for block_px in (20_000, 600_000):  # from level 1, k = 2: strips; blocks of 2 x 1 stored tiles
                thumb, level = slide.read_thumbnail(8, block_px=block_px)
                assert level == 1 and thumb.tobytes() == slide.read_level(1).reduce(2).tobytes()


def test_a_non_integer_reduction_keeps_the_geometry(tmp_path):
    path = tmp_path / "small.svs"
    # tissue in x 960..2880, y 640..1920 of a 4000 x 3200 slide: edges on JPEG blocks at level 1 (4x, 1000 x 800)
    write_large_slide(path, 4000, 3200, [(960, 640, 2880, 1920)])
    with Slide(path, "small") as slide:
        thumb, level = slide.read_thumbnail(10, block_px=6_000)  # 2.5 level-1 px per thumbnail px, many strips
        whole = slide.read_level(1).resize(thumb.size, Image.Resampling.BOX)
    assert level == 1 and thumb.size == (400, 320)
    pixels = np.asarray(thumb).astype(int)
    assert np.abs(pixels - np.asarray(whole)).max() <= 1  # strips agree with one resize of the whole level
    tissue = (np.abs(pixels - GLASS).max(axis=2) > 12)
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (64, 192, 96, 288)  # level-0 edges / 10


def test_a_broken_slide_fails_naming_it(tmp_path, demo_slides):
    broken = tmp_path / "broken.svs"
    data = bytearray(demo_slides[0].read_bytes())
    with tifffile.TiffFile(demo_slides[0]) as tif:  # garble the JPEG tiles of the 16x level, keep the layout
        page = tif.pages[3]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset + 2 : offset + count] = bytes(count - 2)
    broken.write_bytes(bytes(data))
    with Slide(broken, "b") as slide:
        with pytest.raises(SlideError, match=r"^slide 'b' \(.*broken.svs\): cannot read region at .* level 2: "):
            slide.read_thumbnail(32, block_px=5_000)


def test_tiling_a_100k_by_80k_slide_with_only_1x_and_4x_levels_stays_under_1_5_gb(tmp_path):
    wsi = tmp_path / "large.svs"
    write_large_slide(wsi, 100_000, 80_000, [TISSUE])
    with Slide(wsi, "large") as slide:
        assert slide.level_dimensions == ((100_000, 80_000), (25_000, 20_000))  # the 4x level: 500 Mpx
    out = tmp_path / "out"
    cmd = [str(BIN / "pathgen"), "tile", str(wsi), "--slide-id", "large", "--params", str(ROOT / "params.yaml"),
           "--grid", str(out / "grid.parquet"), "--thumbnail", str(out / "thumb.png"), "--info", str(out / "info.json")]
    proc = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["returncode"] == 0, proc.stderr
    assert measured["maxrss_kb"] <= LIMIT_KB, f"peak RSS {measured['maxrss_kb'] / 1024:.0f} MB"

    info = json.loads((out / "info.json").read_text())
    assert info["mask_level"] == 1 and info["thumbnail_scale"] == [32, 32]
    assert Image.open(out / "thumb.png").size == (3125, 2500)
    assert info["grid_cells"] == (100_000 // PATCH) * (80_000 // PATCH)
    grid = pl.read_parquet(out / "grid.parquet")
    x0, y0, x1, y1 = TISSUE
    expected = {(x, y) for y in range(y0, y1, PATCH) for x in range(x0, x1, PATCH)}
    assert set(grid.select("x", "y").iter_rows()) == expected  # every tissue patch, none on the glass
    assert info["patches"] == grid.height == 1024 and grid["tissue"].min() >= 0.9
