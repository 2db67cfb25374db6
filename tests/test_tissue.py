"""Tissue mask known answers on synthetic thumbnails (numpy-built; no slide files)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml
from conftest import ROOT
from PIL import Image
from scipy import ndimage

from pathgen.wsi.tissue import otsu_threshold, tissue_mask

H, W = 240, 360
GLASS = (240, 240, 240)
PALE = (218, 206, 213)  # light pink-grey: HSV saturation ~14, under min_saturation; OD ~0.066 in green
# Pale colours for the two-stain slide: one only the OD cue sees, one both cues see (saturation ~32).
PALE_COLOURS = {"pink-grey": PALE, "light-pink": (226, 198, 214)}


@pytest.fixture(scope="module")
def mask_params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["tile"]["mask"]


def ellipse(cy: float, cx: float, ry: float, rx: float, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def glass(rng: np.random.Generator, shape=(H, W), colour=GLASS) -> np.ndarray:
    return np.asarray(colour, np.float64) + rng.normal(0, 3, shape + (3,))


def he_stain(rng: np.random.Generator, shape) -> np.ndarray:
    """Strong H&E: pink eosin background with purple haematoxylin nuclei, textured."""
    pink = np.array([228, 120, 178], np.float64)
    purple = np.array([110, 55, 150], np.float64)
    nuclei = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.55
    out = np.where(nuclei[..., None], purple, pink)
    return out + rng.normal(0, 8, shape + (3,))


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def old_saturation_otsu(image: Image.Image, params: dict) -> np.ndarray:
    """The previous method: Otsu on median-filtered HSV saturation (floored), closing, holes filled.

    (Its small-object step is left out: it only removes.)"""
    sat = np.asarray(image.convert("HSV"))[..., 1]
    sat = ndimage.median_filter(sat, size=2 * params["blur_radius"] + 1, mode="nearest")
    mask = sat > max(otsu_threshold(sat), params["min_saturation"])
    r = params["close_radius"]
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    mask = ndimage.binary_closing(np.pad(mask, r), structure=xx**2 + yy**2 <= r**2)[r:-r, r:-r]
    return ndimage.binary_fill_holes(mask)


@pytest.fixture(scope="module", params=sorted(PALE_COLOURS))
def two_stain_slide(request):
    """Glass, a strongly stained H&E region on the left, a pale one on the right."""
    colour = PALE_COLOURS[request.param]
    rng = np.random.default_rng(7)
    strong = ellipse(120, 95, 80, 70)
    pale = ellipse(120, 265, 75, 70)
    pixels = glass(rng)
    pixels[strong] = he_stain(rng, (H, W))[strong]
    pixels[pale] = (np.asarray(colour, np.float64) + rng.normal(0, 3, (H, W, 3)))[pale]
    return to_image(pixels), strong, pale


def region_ious(mask, strong, pale):
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True  # the strong region lies in the left half, the pale one in the right
    return {
        "strong": iou(mask & left, strong),
        "pale": iou(mask & ~left, pale),
        "background": iou(~mask, ~(strong | pale)),
    }


def test_pale_and_strong_tissue_both_kept(two_stain_slide, mask_params, caplog):
    image, strong, pale = two_stain_slide
    with caplog.at_level(logging.INFO, logger="pathgen.wsi.tissue"):
        mask = tissue_mask(image, mask_params, min_object_px=200)
    got = region_ious(mask, strong, pale)
    assert min(got.values()) >= 0.9, got
    assert "optical density >" in caplog.text and "saturation >" in caplog.text and "glass found" in caplog.text


def test_saturation_otsu_alone_drops_the_pale_region(two_stain_slide, mask_params):
    """The same image defeats the previous method: Otsu splits the two tissue colours."""
    image, strong, pale = two_stain_slide
    sat = ndimage.median_filter(np.asarray(image.convert("HSV"))[..., 1], size=2 * mask_params["blur_radius"] + 1)
    split = otsu_threshold(sat)
    assert np.median(sat[pale]) < split < np.median(sat[strong])
    got = region_ious(old_saturation_otsu(image, mask_params), strong, pale)
    assert got["strong"] >= 0.9 and got["pale"] < 0.1, got


def test_all_glass_gives_an_empty_mask(mask_params):
    rng = np.random.default_rng(11)
    tinted = glass(rng, colour=(236, 238, 246))
    tinted += np.linspace(-4, 4, W)[None, :, None]  # uneven illumination across the slide
    for pixels in (glass(rng), tinted):
        assert not tissue_mask(to_image(pixels), mask_params, min_object_px=200).any()


def test_mostly_tissue_still_segments(mask_params):
    """~90 % tissue (strong stain around a pale island), glass only in a strip: the glass is still found."""
    rng = np.random.default_rng(5)
    tissue = np.zeros((H, W), bool)
    tissue[:, : W - 36] = True
    pale = ellipse(120, 160, 60, 90)
    pixels = glass(rng)
    pixels[tissue] = he_stain(rng, (H, W))[tissue]
    pixels[pale] = (np.asarray(PALE, np.float64) + rng.normal(0, 3, (H, W, 3)))[pale]
    mask = tissue_mask(to_image(pixels), mask_params, min_object_px=200)
    assert iou(mask, tissue) >= 0.95
    assert mask[pale].mean() >= 0.99


def test_no_glass_at_all_keeps_the_stained_tissue(mask_params):
    rng = np.random.default_rng(6)
    mask = tissue_mask(to_image(he_stain(rng, (H, W))), mask_params, min_object_px=200)
    assert mask.mean() >= 0.99
