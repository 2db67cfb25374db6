"""Whole-slide images: OpenSlide reading with failures named by slide, tissue segmentation, grids.

No models and no tables here; the steps `tile`, `embed` and `patches` build on it.
"""
