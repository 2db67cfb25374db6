"""patches: cut a slide's kept selection at full resolution into one deterministic tar.

Members are `x{X}_y{Y}.jpg` (level-0 coordinates, zero-padded so name order is
grid order), with fixed mtime, owner and mode; JPEG settings are fixed, so the
same selection gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pathgen.store.io import encode_jpeg, write_tar
from pathgen.store.patch_tars import member_name
from pathgen.wsi.slide import Slide


def extract_patches(slide: Slide, selection: pl.DataFrame, jpeg_quality: int) -> dict[str, bytes]:
    """JPEG bytes of every kept patch of `selection`, by member name."""
    kept = selection.filter(pl.col("kept")).sort("tile")
    members: dict[str, bytes] = {}
    for row in kept.select("x", "y", "level", "read_size", "out_size").iter_rows():
        x, y, level, read_size, out_size = (int(v) for v in row)
        members[member_name(x, y)] = encode_jpeg(slide.read_patch(x, y, level, read_size, out_size), jpeg_quality)
    return members


def run_patches(wsi: str | Path, slide_id: str, selection_path: str | Path, params: dict[str, Any],
                out: str | Path, mpp_override: float | None = None) -> int:
    """The patches step: write `out` (tar of JPEGs); returns the number of patches."""
    selection = pl.read_parquet(selection_path)
    with Slide(wsi, slide_id, mpp_override) as slide:
        members = extract_patches(slide, selection, params["jpeg_quality"])
    write_tar(members, out)
    return len(members)


def write_quarantined_patches(out: str | Path) -> None:
    """The patch tar of a quarantined slide: no members (the slide is not opened)."""
    write_tar({}, out)
