"""Synthetic Aperio slides and the demo set, read back with real OpenSlide."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest

from pathgen.demo import slides as demo
from pathgen.demo.slides import (
    ADIPOSE,
    BACKGROUND,
    DEMO_SLIDES,
    GLANDS,
    LYMPHOCYTES,
    NECROSIS,
    STROMA,
    TEXTURES,
    TUMOR,
    blob_label_map,
    make_demo,
    rectangle_label_map,
    write_synthetic_slide,
)

CELL = 256  # level-0 px per label-map cell in these tests (a multiple of 16)
RECT = (1, 1, 5, 7)  # (r0, c0, r1, c1) in cells


def _region(slide: openslide.OpenSlide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    return np.asarray(slide.read_region((x, y), level, (w, h)).convert("RGB")).astype(np.float64)


def _saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation (0..255), as PIL computes it."""
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    return float(np.mean(np.where(mx > 0, (mx - mn) / np.maximum(mx, 1) * 255, 0)))


@pytest.fixture(scope="module")
def tumor_slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("slide") / "rect.svs"
    label_map = rectangle_label_map(6, 8, RECT, TUMOR)
    write_synthetic_slide(path, label_map, cell_px=CELL, seed=7)
    return path, label_map


def test_rectangle_label_map():
    m = rectangle_label_map(4, 5, (1, 2, 3, 4), STROMA)
    assert m.dtype == np.uint8 and m.shape == (4, 5)
    assert (m[1:3, 2:4] == STROMA).all() and m.sum() == 4 * STROMA
    with pytest.raises(ValueError):
        rectangle_label_map(4, 5, (1, 2, 5, 4), STROMA)


def test_opens_as_aperio(tumor_slide):
    path, label_map = tumor_slide
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.25
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == 0.25
        assert int(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 40
        rows, cols = label_map.shape
        assert slide.dimensions == (cols * CELL, rows * CELL)
        assert slide.level_count >= 3
        assert slide.level_downsamples[:3] == pytest.approx((1.0, 4.0, 16.0))
        assert slide.level_dimensions[1] == (cols * CELL // 4, rows * CELL // 4)
        assert slide.level_dimensions[2] == (cols * CELL // 16, rows * CELL // 16)
        assert "thumbnail" in slide.associated_images
        assert slide.properties["tiff.Software"] == demo.SOFTWARE
        assert "tiff.DateTime" not in slide.properties


def test_tissue_differs_from_background(tumor_slide):
    path, _ = tumor_slide
    r0, c0, r1, c1 = RECT
    with openslide.OpenSlide(str(path)) as slide:
        inside = _region(slide, c0 * CELL + CELL // 2, r0 * CELL + CELL // 2, 0, (c1 - c0 - 1) * CELL, (r1 - r0 - 1) * CELL)
        outside = _region(slide, 0, 0, 0, 8 * CELL, CELL // 2)  # the top background row
    bg_mean, in_mean = outside.reshape(-1, 3).mean(0), inside.reshape(-1, 3).mean(0)
    assert bg_mean.min() > 225  # near-white glass
    assert _saturation(outside) < 12
    assert _saturation(inside) > 70
    assert np.linalg.norm(in_mean - bg_mean) > 80
    assert in_mean[1] < in_mean[0] and in_mean[1] < in_mean[2]  # purple/pink: green absorbed most


def test_reduced_levels_agree_with_level0(tumor_slide):
    path, _ = tumor_slide
    x, y, size = 1 * CELL + 64, 2 * CELL + 64, 512  # straddles tissue and background
    with openslide.OpenSlide(str(path)) as slide:
        l0 = _region(slide, x, y, 0, size, size)
        for level, ds in ((1, 4), (2, 16)):
            lk = _region(slide, x, y, level, size // ds, size // ds)
            assert np.abs(lk.reshape(-1, 3).mean(0) - l0.reshape(-1, 3).mean(0)).max() < 3.0
        # block structure agrees too, not only the overall mean
        l1 = _region(slide, x, y, 1, size // 4, size // 4)
        blocks0 = l0.reshape(8, 64, 8, 64, 3).mean(axis=(1, 3))
        blocks1 = l1.reshape(8, 16, 8, 16, 3).mean(axis=(1, 3))
        assert np.abs(blocks0 - blocks1).max() < 6.0


def test_textures_are_distinct(tmp_path):
    classes = sorted(TEXTURES)
    label_map = np.zeros((4, 3 * len(classes) + 1), np.uint8)
    for i, c in enumerate(classes):
        label_map[1:3, 3 * i + 1 : 3 * i + 3] = c
    path = tmp_path / "all.svs"
    write_synthetic_slide(path, label_map, cell_px=CELL, seed=11)
    feats = {}
    with openslide.OpenSlide(str(path)) as slide:
        bg = _region(slide, 0, 0, 0, 512, 128)
        for i, c in enumerate(classes):
            patch = _region(slide, (3 * i + 1) * CELL + CELL // 2, CELL + CELL // 2, 0, CELL, CELL)
            feats[c] = (patch.reshape(-1, 3).mean(0), patch.reshape(-1, 3).std(0), _saturation(patch))
    bg_mean, bg_std = bg.reshape(-1, 3).mean(0), bg.reshape(-1, 3).std(0)
    for c in (TUMOR, STROMA, GLANDS, LYMPHOCYTES, NECROSIS):
        mean, _, sat = feats[c]
        assert sat > 40, TEXTURES[c]
        assert np.linalg.norm(mean - bg_mean) > 40, TEXTURES[c]
    # adipose is mostly white: it differs by its thin pink membranes
    assert feats[ADIPOSE][1][1] > 4 * bg_std[1]
    # every pair differs in colour or texture
    for a in classes:
        for b in classes:
            if a < b:
                fa, fb = np.concatenate(feats[a][:2]), np.concatenate(feats[b][:2])
                assert np.linalg.norm(fa - fb) > 12, (TEXTURES[a], TEXTURES[b])
    # nuclear classes are darker than the eosin-only ones
    assert feats[LYMPHOCYTES][0].mean() < feats[TUMOR][0].mean() < feats[STROMA][0].mean()


def test_same_arguments_same_bytes(tmp_path):
    label_map = rectangle_label_map(3, 4, (1, 1, 2, 3), STROMA)
    label_map[1, 3] = LYMPHOCYTES
    a, b, c = tmp_path / "a.svs", tmp_path / "b.svs", tmp_path / "c.svs"
    write_synthetic_slide(a, label_map, cell_px=CELL, seed=1)
    write_synthetic_slide(b, label_map, cell_px=CELL, seed=1)
    write_synthetic_slide(c, label_map, cell_px=CELL, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic writer left nothing behind


def test_tiles_do_not_depend_on_order():
    label_map = rectangle_label_map(3, 4, (0, 1, 3, 3), TUMOR)
    label_map[:, 2] = GLANDS
    first = demo._SlideRenderer(label_map, CELL, 5, 256)
    second = demo._SlideRenderer(label_map, CELL, 5, 256)
    order = [(ty, tx) for ty in range(first.tiles_down) for tx in range(first.tiles_across)]
    tiles_a = {k: np.asarray(first.render(*k)) for k in order}
    tiles_b = {k: np.asarray(second.render(*k)) for k in reversed(order)}
    for k in order:
        assert np.array_equal(tiles_a[k], tiles_b[k]), k


def test_blob_label_map():
    m = blob_label_map(18, 28, [TUMOR, STROMA, ADIPOSE, GLANDS], seed=3)
    assert m.shape == (18, 28) and m.dtype == np.uint8
    assert 0.55 <= (m > 0).mean() <= 0.72
    assert set(np.unique(m)) == {BACKGROUND, TUMOR, STROMA, ADIPOSE, GLANDS}
    assert (m[0] == 0).all() and (m[-1] == 0).all() and (m[:, 0] == 0).all() and (m[:, -1] == 0).all()
    assert np.array_equal(m, blob_label_map(18, 28, [TUMOR, STROMA, ADIPOSE, GLANDS], seed=3))
    assert not np.array_equal(m, blob_label_map(18, 28, [TUMOR, STROMA, ADIPOSE, GLANDS], seed=4))


def test_make_demo(tmp_path):
    root = tmp_path / "a"
    manifest = make_demo(root, seed=0, scale=0.15)
    assert manifest == root / "data" / "slides.tsv"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert list(rows[0]) == ["slide_id", "path", "tissue", "project", "mpp", "report"]
    assert [r["slide_id"] for r in rows] == [s.slide_id for s in DEMO_SLIDES]
    assert len(rows) == 3 and len({r["tissue"] for r in rows}) == 3
    assert {r["project"] for r in rows} == {"TCGA-LUAD", "TCGA-BRCA", "TCGA-COAD"}
    assert all(r["mpp"] == "" for r in rows)
    assert sum(r["report"] == "" for r in rows) == 1
    for r in rows:
        assert not Path(r["path"]).is_absolute()
        assert (root / r["path"]).is_file()
        if r["report"]:
            text = (root / r["report"]).read_text()
            assert 80 <= len(text.split()) <= 200
        with openslide.OpenSlide(str(root / r["path"])) as slide:
            assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            assert slide.level_count >= 3
            assert min(slide.level_dimensions[-1]) >= 100
    # same seed and scale: identical bytes in every file
    other = tmp_path / "b"
    make_demo(other, seed=0, scale=0.15)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (other / rel).read_bytes(), rel
