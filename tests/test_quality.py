"""Patch quality control (pathgen.wsi.quality) on known answers: planted glass, marker ink, folds and defocus."""

from __future__ import annotations

import colorsys

import numpy as np
import openslide
import pytest
from PIL import Image

from pathgen.demo import artefacts
from pathgen.demo import slides as demo
from pathgen.demo.artefacts import QC_CLASSES, qc_patches
from pathgen.store.seeds import derive_seed
from pathgen.wsi import quality
from pathgen.wsi.quality import MEASURES, REASONS, THRESHOLDS, measure, pixel_classes, qc_reasons

PER_CLASS = 24  # patches per class in the known-answer set
RECALL_FLOOR = 0.9  # per reason: planted artefacts flagged with their reason
PRECISION_FLOOR = 0.9  # per reason: flagged patches that carry that artefact
CLEAN_FLAGGED_CEILING = 0.05  # clean tissue flagged for any reason

EXPECTED = {"clean": None, "background": "background", "pen": "pen", "fold": "fold", "blur": "blur"}


@pytest.fixture(scope="module")
def qc_set() -> tuple[list[str], list[dict], np.ndarray]:
    data = list(qc_patches(PER_CLASS, seed=3))
    return [d[0] for d in data], [d[1] for d in data], np.stack([d[2] for d in data])


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def test_laplacian_variance_known_answer():
    # vertical stripes of grey 100 / 150: the 4-neighbour Laplacian is +100 / -100 everywhere inside
    stripes = np.where(np.arange(336) % 2 == 0, 100, 150)[None, :].repeat(336, axis=0)
    m = measure(_grey(stripes))
    assert m["laplacian_variance"] == 10000.0
    assert m["background_fraction"] == 0.0 and m["pen_fraction"] == 0.0 and m["dark_fraction"] == 0.0
    flat = measure(_grey(np.full((336, 336), 120)))
    assert flat["laplacian_variance"] == 0.0
    glass = measure(_grey(np.full((336, 336), 240)))
    assert glass["background_fraction"] == 1.0 and glass["glass_fraction"] == 1.0


def test_focus_measure_ignores_glass():
    # the same stripes on the left half, glass on the right: tissue-only variance is unchanged
    img = np.full((336, 336), 240)
    img[:, :168] = np.where(np.arange(168) % 2 == 0, 100, 150)[None, :]
    m = measure(_grey(img))
    assert m["laplacian_variance"] == 10000.0
    assert 0.3 < m["glass_fraction"] <= 0.5


def test_luma_is_pil_grey():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.int32)
    assert np.abs(quality.luma(rgb) - pil).max() <= 1


def test_pen_colour_is_a_hue_range():
    """16 (G - R) >= chroma (chroma >= PEN_MIN_CHROMA) is exactly hue in [63.75, 236.25] degrees."""
    lo, hi = 60 + 60 / quality.PEN_HUE_SLOPE, 240 - 60 / quality.PEN_HUE_SLOPE
    assert (lo, hi) == (63.75, 236.25)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40000, 3), dtype=np.uint8)
    pen = pixel_classes(rgb)["pen"]
    black = pixel_classes(rgb)["pen"] & (rgb.max(axis=1) <= quality.BLACK_MAX_VALUE)
    checked = 0
    for (r, g, b), p, k in zip(rgb.tolist(), pen.tolist(), black.tolist()):
        chroma = max(r, g, b) - min(r, g, b)
        if chroma < quality.PEN_MIN_CHROMA or k:
            continue
        hue = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0] * 360
        if min(abs(hue - lo), abs(hue - hi)) < 1e-6:
            continue
        assert p == (lo <= hue <= hi), (r, g, b, hue)
        checked += 1
    assert checked > 20000


def test_stain_colours_are_not_pen():
    """No haematoxylin / eosin mix of the demo's Beer-Lambert model up to H + E = 5 reads as ink; glass is glass."""
    rgb = demo._LUT.view(np.uint8).reshape(-1, 4)[:, :3]
    idx = np.arange(len(rgb))
    h, e = idx // demo._LUT_NE / demo._LUT_STEPS, idx % demo._LUT_NE / demo._LUT_STEPS
    classes = pixel_classes(rgb)
    assert not classes["pen"][h + e <= 5].any()
    assert classes["glass"][0]  # no stain: the slide's glass
    # only the palest stain reads as glass: haematoxylin under 0.25 and eosin under 0.12 (concentration units)
    assert not classes["glass"][(h >= 0.25) | (e >= 0.12)].any()
    assert classes["glass"][(h <= 0.1) & (e <= 0.05)].all()


def test_inks_over_tissue_are_pen():
    tissue = [np.asarray(img) for _, img in demo.texture_patches(1, seed=5, size=336)]
    for name, ink in artefacts.INKS.items():
        for rgb in tissue:
            inked = artefacts.apply_ink(rgb, np.full(rgb.shape[:2], 256), ink)
            assert measure(inked)["pen_fraction"] > 0.9, name
            assert measure(rgb)["pen_fraction"] < 0.01


def test_batch_and_single_agree(qc_set):
    _, _, x = qc_set
    batch = measure(x[:6])
    for i in range(6):
        single = measure(x[i])
        for k in MEASURES:
            assert single[k] == batch[k][i], k
    assert set(batch) == set(MEASURES)
    again = measure(x[:6])
    assert all(np.array_equal(again[k], batch[k]) for k in MEASURES)
    with pytest.raises(ValueError):
        measure(x[0].astype(np.float32))
    with pytest.raises(ValueError):
        measure(x[0, :, :, :2])


def test_qc_reasons_order_and_switches():
    m = {
        "background_fraction": np.array([0.9, 0.0, 0.0, 0.0, 0.0, 0.0]),
        "glass_fraction": np.zeros(6),
        "pen_fraction": np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0]),
        "dark_fraction": np.array([0.5, 0.5, 0.5, 0.0, 0.0, 0.0]),
        "laplacian_variance": np.array([1.0, 1.0, 1.0, 1.0, 1000.0, THRESHOLDS["min_laplacian_variance"]]),
    }
    assert qc_reasons(m) == ["background", "pen", "fold", "blur", None, None]
    assert qc_reasons(m, {"enabled": False}) == [None] * 6
    assert qc_reasons(m, {"max_pen_fraction": None}) == ["background", "fold", "fold", "blur", None, None]
    assert qc_reasons(m, {"min_laplacian_variance": 0.5}) == ["background", "pen", "fold", None, None, None]
    single = {k: float(v[2]) for k, v in m.items()}
    assert qc_reasons(single) == "fold"
    assert REASONS == ("background", "pen", "fold", "blur")


def test_known_answers_recall_and_precision(qc_set):
    labels, details, x = qc_set
    reasons = qc_reasons(measure(x))
    assert set(labels) == set(QC_CLASSES) and len(labels) == PER_CLASS * len(QC_CLASSES)
    clean = [r for lab, r in zip(labels, reasons) if lab == "clean"]
    assert sum(r is not None for r in clean) <= CLEAN_FLAGGED_CEILING * len(clean), clean
    for label, reason in EXPECTED.items():
        if reason is None:
            continue
        planted = [r for lab, r in zip(labels, reasons) if lab == label]
        recall = sum(r == reason for r in planted) / len(planted)
        flagged = [lab for lab, r in zip(labels, reasons) if r == reason]
        precision = sum(lab == label for lab in flagged) / max(1, len(flagged))
        assert recall >= RECALL_FLOOR, (reason, recall, planted)
        assert precision >= PRECISION_FLOOR, (reason, precision, flagged)
    # every ink is caught, not only on average
    for ink in artefacts.INKS:
        got = [r for lab, d, r in zip(labels, details, reasons) if lab == "pen" and d["ink"] == ink]
        assert got and sum(r == "pen" for r in got) >= RECALL_FLOOR * len(got), (ink, got)


def test_same_patch_sharp_and_defocused():
    for cls, img in demo.texture_patches(1, seed=9, size=672):
        sharp = np.asarray(img)
        small = np.asarray(Image.fromarray(sharp).reduce(2))
        blurred = np.asarray(Image.fromarray(artefacts.box_blur(sharp, 3)).reduce(2))
        ms, mb = measure(small), measure(blurred)
        assert ms["laplacian_variance"] > 3 * mb["laplacian_variance"], demo.TEXTURES[cls]
        assert qc_reasons(mb) in ("blur", "background"), demo.TEXTURES[cls]
        if cls != demo.ADIPOSE:
            assert qc_reasons(ms) is None, (demo.TEXTURES[cls], ms)


def test_box_blur_is_integer_mean():
    rgb = np.zeros((9, 9, 3), np.uint8)
    rgb[4, 4] = 90
    one = artefacts.box_blur(rgb, 1, passes=1)
    assert one[3:6, 3:6, 0].tolist() == [[10] * 3] * 3 and one[..., 0].sum() == 90
    assert np.array_equal(artefacts.box_blur(np.full((5, 5, 3), 77, np.uint8), 2), np.full((5, 5, 3), 77, np.uint8))


# ---------------------------------------------------------------------------
# The demo slides carry a marker stroke and an out-of-focus block


def _cells(path, label_map: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The 336 px model input of every tissue cell (= patch) of a demo slide, read with OpenSlide."""
    cell = demo.DEMO_CELL_PX
    out = {}
    with openslide.OpenSlide(str(path)) as slide:
        for r, c in zip(*np.nonzero(label_map)):
            img = slide.read_region((int(c) * cell, int(r) * cell), 0, (cell, cell)).convert("RGB")
            out[int(r), int(c)] = np.asarray(img.reduce(2))
    return out


@pytest.mark.parametrize("scale", [0.35])
def test_demo_slides_show_qc(tmp_path, scale):
    demo.make_demo(tmp_path, seed=0, scale=scale)
    rows, cols = demo.demo_grid(scale)
    cell = demo.DEMO_CELL_PX
    seen = {"pen": 0, "blur": 0}
    clean_flagged, clean_total = 0, 0
    for spec in demo.DEMO_SLIDES:
        label_map = demo.blob_label_map(rows, cols, list(spec.classes), seed=derive_seed(0, spec.slide_id, "labels"))
        pens, boxes = demo.demo_artefacts(spec, label_map)
        assert bool(pens) == (spec.pen is not None) and bool(boxes) == spec.defocus
        cells = _cells(tmp_path / f"data/demo/{spec.slide_id}.svs", label_map)
        keys = sorted(cells)
        reasons = dict(zip(keys, qc_reasons(measure(np.stack([cells[k] for k in keys])))))
        coords = np.arange(cell, dtype=np.float64) + 0.5
        for (r, c), reason in reasons.items():
            cover = 0.0
            for s in pens:
                alpha = artefacts.segment_alpha(coords + c * cell, coords + r * cell, (s.x0, s.y0), (s.x1, s.y1), s.half_width)
                cover = max(cover, float((alpha >= 128).mean()))
            inside = any(b.x0 <= c * cell and (c + 1) * cell <= b.x1 and b.y0 <= r * cell and (r + 1) * cell <= b.y1 for b in boxes)
            near = any(b.x0 - cell <= c * cell < b.x1 and b.y0 - cell <= r * cell < b.y1 for b in boxes)
            if cover >= 0.1:
                assert reason == "pen", (spec.slide_id, r, c, cover, reason)
                seen["pen"] += 1
            elif inside:
                assert reason == "blur", (spec.slide_id, r, c, reason)
                seen["blur"] += 1
            elif cover == 0.0 and not near and label_map[r, c] != demo.ADIPOSE:
                clean_total += 1
                clean_flagged += reason is not None
    assert seen["pen"] >= 4 and seen["blur"] >= 4, seen
    assert clean_flagged <= CLEAN_FLAGGED_CEILING * clean_total, (clean_flagged, clean_total)


def test_demo_artefacts_are_tile_independent(tmp_path):
    """Defocus and ink drawn tile by tile equal the same operations on the whole plain image, in any tile order."""
    label_map = demo.rectangle_label_map(4, 5, (0, 1, 4, 4), demo.TUMOR)
    label_map[:, 3] = demo.STROMA
    cell, tile = 128, 128
    box = demo.Defocus(100, 90, 400, 330, radius=4)  # straddles tile borders
    pen = demo.PenStroke("green", 20.0, 400.0, 600.0, 150.0, half_width=40.0)
    plain = demo._SlideRenderer(label_map, cell, 5, tile)
    first = demo._SlideRenderer(label_map, cell, 5, tile, pen_strokes=[pen], defocus=[box])
    second = demo._SlideRenderer(label_map, cell, 5, tile, pen_strokes=[pen], defocus=[box])
    order = [(ty, tx) for ty in range(first.tiles_down) for tx in range(first.tiles_across)]
    a = {k: np.asarray(first.render(*k)) for k in order}
    b = {k: np.asarray(second.render(*k)) for k in reversed(order)}
    for k in order:
        assert np.array_equal(a[k], b[k]), k

    def whole(tiles):
        return np.concatenate([np.concatenate([tiles[ty, tx] for tx in range(first.tiles_across)], 1) for ty in range(first.tiles_down)], 0)

    base = whole({k: np.asarray(plain.render(*k)) for k in order})
    expect = base.copy()
    expect[box.y0 : box.y1, box.x0 : box.x1] = artefacts.box_blur(base, box.radius)[box.y0 : box.y1, box.x0 : box.x1]
    coords_x = np.arange(base.shape[1], dtype=np.float64) + 0.5
    coords_y = np.arange(base.shape[0], dtype=np.float64) + 0.5
    alpha = artefacts.segment_alpha(coords_x, coords_y, (pen.x0, pen.y0), (pen.x1, pen.y1), pen.half_width, pen.edge)
    expect = artefacts.apply_ink(expect, alpha, artefacts.INKS[pen.ink])
    got = whole(a)
    assert np.array_equal(got, expect)
    assert not np.array_equal(got, base)
    # and the slide file: the same arguments give the same bytes
    p, q = tmp_path / "p.svs", tmp_path / "q.svs"
    for path in (p, q):
        demo.write_synthetic_slide(path, label_map, cell_px=cell, seed=5, tile=tile, pen_strokes=[pen], defocus=[box])
    assert p.read_bytes() == q.read_bytes()
    with pytest.raises(ValueError):
        demo.write_synthetic_slide(p, label_map, cell_px=cell, seed=5, tile=tile, pen_strokes=[demo.PenStroke("red", 0, 0, 1, 1, 5)])
