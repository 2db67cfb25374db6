"""tile, embed and patches on synthetic slides with known geometry (real OpenSlide, real open_clip)."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import tifffile
import yaml
from conftest import ROOT

from pathgen.demo.slides import rectangle_label_map, write_synthetic_slide
from pathgen.demo.tiny_models import build_tiny_clip
from pathgen.errors import ModelError, SlideError
from pathgen.steps.embed import run_embed
from pathgen.steps.patches import run_patches
from pathgen.steps.tile import run_tile, tile_slide
from pathgen.store.embeddings import read_embeddings
from pathgen.store.io import read_tar
from pathgen.store.patch_tars import member_name
from pathgen.wsi.slide import Slide

CELL = 512
ROWS, COLS = 12, 16
RECT = (3, 4, 9, 12)  # rows 3..8, cols 4..11 of tissue


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def rect_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "rect.svs"
    write_synthetic_slide(path, rectangle_label_map(ROWS, COLS, RECT, 2), cell_px=CELL, seed=3)
    return path


@pytest.fixture(scope="module")
def clip_cfg(params, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    build_tiny_clip(out)
    return dict(params["clip"], config=str(out / "pathgen-tiny-clip.json"), checkpoint=str(out / "open_clip_model.pt"))


def tile_params(params, **changes):
    tile = copy.deepcopy(params["tile"])
    tile.update(changes)
    return tile


def test_tissue_mask_matches_known_rectangle(rect_slide, params):
    with Slide(rect_slide, "rect") as slide:
        _, _, info = tile_slide(slide, tile_params(params, patch_size=CELL))
        from pathgen.wsi.tissue import tissue_mask

        thumb, level = slide.read_thumbnail(params["tile"]["mask"]["downsample"])
        mask = tissue_mask(thumb, params["tile"]["mask"])
    assert level == info["mask_level"]
    sx, sy = info["thumbnail_scale"]
    truth = np.zeros_like(mask)
    r0, c0, r1, c1 = RECT
    truth[round(r0 * CELL / sy): round(r1 * CELL / sy), round(c0 * CELL / sx): round(c1 * CELL / sx)] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou >= 0.9, iou


def test_grid_has_exactly_the_tissue_cells(rect_slide, params):
    with Slide(rect_slide, "rect") as slide:
        grid, thumb, info = tile_slide(slide, tile_params(params, patch_size=CELL))
    r0, c0, r1, c1 = RECT
    expected = {(c * CELL, r * CELL) for r in range(r0, r1) for c in range(c0, c1)}
    assert set(grid.select("x", "y").iter_rows()) == expected
    assert grid.height == 48 == info["patches"]
    assert info["grid_cells"] == ROWS * COLS
    assert (grid["level"] == 0).all() and (grid["read_size"] == CELL).all()
    assert info["vendor"] == "aperio" and info["mpp"] == pytest.approx(0.25)
    # the thumbnail is at the mask's downsample (32), reduced from the best level (16 here: levels 1, 4, 16)
    assert info["level_downsamples"][info["mask_level"]] == 16
    assert thumb.size == (COLS * CELL // 32, ROWS * CELL // 32) and info["thumbnail_scale"] == [32, 32]


def test_paper_grid_uses_672_px_at_level_0(rect_slide, params):
    with Slide(rect_slide, "rect") as slide:
        grid, _, _ = tile_slide(slide, params["tile"])
    assert (grid["size"] == 672).all() and (grid["x"] % 672 == 0).all() and (grid["y"] % 672 == 0).all()
    got = set(grid.select("x", "y").iter_rows())
    r0, c0, r1, c1 = (v * CELL for v in RECT)
    for y in range(0, ROWS * CELL - 671, 672):
        for x in range(0, COLS * CELL - 671, 672):
            overlap = max(0, min(x + 672, c1) - max(x, c0)) * max(0, min(y + 672, r1) - max(y, r0)) / 672**2
            if overlap >= 0.6:
                assert (x, y) in got
            elif overlap <= 0.4:
                assert (x, y) not in got


def test_mpp_mode_sizes_patches_from_the_slide_resolution(rect_slide, params):
    with Slide(rect_slide, "rect") as slide:
        grid, _, _ = tile_slide(slide, tile_params(params, mode="mpp", target_mpp=0.5, patch_size=256))
    assert (grid["size"] == 512).all() and (grid["out_size"] == 256).all() and grid.height == 48
    with Slide(rect_slide, "rect", mpp_override=0.125) as slide:  # the manifest's override wins
        grid, _, _ = tile_slide(slide, tile_params(params, mode="mpp", target_mpp=0.5, patch_size=256))
    assert (grid["size"] == 1024).all()


def test_mpp_mode_fails_clearly_without_mpp(tmp_path, params):
    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, np.full((1024, 1024, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with Slide(path, "plain") as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match=r"slide 'plain' .*no mpp .* manifest"):
            tile_slide(slide, tile_params(params, mode="mpp", target_mpp=0.5))


def test_unreadable_files_raise_slide_error_naming_them(tmp_path, rect_slide):
    text = tmp_path / "text.svs"
    text.write_text("hello")
    with pytest.raises(SlideError, match=r"slide 'x' \(.*text.svs\): not a slide format"):
        Slide(text, "x")
    with pytest.raises(SlideError, match="file not found"):
        Slide(tmp_path / "missing.svs", "x")
    truncated = tmp_path / "trunc.svs"
    truncated.write_bytes(rect_slide.read_bytes()[: rect_slide.stat().st_size // 3])
    with pytest.raises(SlideError, match=r"slide 't' \(.*trunc.svs\)"):
        with Slide(truncated, "t") as slide:
            slide.read_level(slide.level_count - 1)


@pytest.fixture(scope="module")
def tiled(rect_slide, params, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled")
    run_tile(rect_slide, "rect", params["tile"], out / "grid.parquet", out / "thumb.png", out / "info.json")
    return out


def test_embed_writes_normalised_features_deterministically(rect_slide, tiled, clip_cfg, params, tmp_path):
    embed = dict(params["embed"], device="cpu", batch_size=8)
    run_embed(rect_slide, "rect", tiled / "grid.parquet", clip_cfg, embed, tmp_path / "a.zarr", progress=False,
              readers=2)
    run_embed(rect_slide, "rect", tiled / "grid.parquet", clip_cfg, embed, tmp_path / "b.zarr", progress=False,
              readers=0)
    features, coords, attrs = read_embeddings(tmp_path / "a.zarr")
    grid = pl.read_parquet(tiled / "grid.parquet")
    assert features.shape == (grid.height, 64)
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=2e-3)
    assert (coords == grid.select("x", "y").to_numpy()).all()
    assert attrs["model"] == "pathgen-tiny-clip" and attrs["patch"]["size"] == 672
    assert len(np.unique(features.round(3), axis=0)) > 1  # patches differ, so do features
    a_files = sorted(p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    for path in a_files:  # reader processes change nothing, to the byte
        assert path.read_bytes() == (tmp_path / "b.zarr" / path.relative_to(tmp_path / "a.zarr")).read_bytes()
    assert not any(str(tmp_path) in p.read_text() for p in a_files if p.name == "zarr.json")


def test_embed_fails_clearly_on_missing_checkpoint(rect_slide, tiled, clip_cfg, params, tmp_path):
    cfg = dict(clip_cfg, checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match=r"nope.pt not found \(params.yaml clip.checkpoint\)"):
        run_embed(rect_slide, "rect", tiled / "grid.parquet", cfg, params["embed"], tmp_path / "e.zarr")
    assert not (tmp_path / "e.zarr").exists()


def test_patches_tar_is_deterministic_and_holds_kept_patches(rect_slide, tiled, tmp_path):
    grid = pl.read_parquet(tiled / "grid.parquet")
    selection = grid.head(5).with_columns(kept=pl.Series([True, False, True, True, False]))
    selection.with_row_index("tile").write_parquet(tmp_path / "sel.parquet")
    run_patches(rect_slide, "rect", tmp_path / "sel.parquet", {"jpeg_quality": 90}, tmp_path / "a.tar")
    run_patches(rect_slide, "rect", tmp_path / "sel.parquet", {"jpeg_quality": 90}, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    members = read_tar(tmp_path / "a.tar")
    kept = selection.filter("kept")
    assert list(members) == [member_name(x, y) for x, y in kept.select("x", "y").iter_rows()]
