"""Import the released PathGen-1.6M JSON: cut its patches from local slides into WebDataset shards.

The released file is a JSON list of {"wsi_id", "position": ["X", "Y"],
"caption", "file_id"}: the WSI (a TCGA slide name), the level-0 top-left of a
672 × 672 px patch at the highest magnification, and its caption. For each
listed slide found locally this writes one shard `{wsi_id}.tar` with, per
pair, `{key}.jpg` (the patch), `{key}.txt` (the caption) and `{key}.json`
(provenance), key = `{wsi_id}/x{X:07d}_y{Y:07d}` as in assembled shards.

Resumable per slide: a slide whose shard exists is skipped; shards are
written atomically, so an interrupted slide leaves nothing and is redone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pathgen.errors import PathgenError
from pathgen.interop.pathgen_json import Pair, read_pathgen_json
from pathgen.store.io import encode_jpeg, sha256_file, write_json, write_tar
from pathgen.store.shards import pair_key
from pathgen.wsi.slide import Slide

SOURCE = "pathgen-1.6m"


def shard_name(wsi_id: str) -> str:
    """File name of the shard holding `wsi_id`'s pairs."""
    return f"{wsi_id}.tar"


def slide_members(slide: Slide, pairs: list[Pair], patch_size: int, jpeg_quality: int) -> dict[str, bytes]:
    """The shard members of one slide's pairs; PathgenError for a position outside the slide."""
    width, height = slide.dimensions
    for p in pairs:
        if not (0 <= p.x and 0 <= p.y and p.x + patch_size <= width and p.y + patch_size <= height):
            raise PathgenError(f"wsi_id '{slide.slide_id}' position ({p.x}, {p.y}): a {patch_size} px patch there "
                               f"lies outside the slide ({width} x {height} px at level 0, {slide.path})")
    members: dict[str, bytes] = {}
    for p in sorted(pairs, key=lambda p: pair_key(slide.slide_id, p.x, p.y)):
        key = pair_key(slide.slide_id, p.x, p.y)
        image = slide.read_patch(p.x, p.y, 0, patch_size, patch_size)
        meta = {"wsi_id": slide.slide_id, "x": p.x, "y": p.y, "size": patch_size, "file_id": p.file_id, "source": SOURCE}
        members[f"{key}.jpg"] = encode_jpeg(image, jpeg_quality)
        members[f"{key}.txt"] = p.caption.encode("utf-8")
        members[f"{key}.json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return members


def import_pathgen_json(json_path: str | Path, slides: dict[str, Path], out_dir: str | Path, patch_size: int = 672,
                        jpeg_quality: int = 95, done_dir: str | Path | None = None) -> dict[str, Any]:
    """Cut the pairs of every locally present slide of a PathGen-1.6M JSON into `out_dir/{wsi_id}.tar`.

    `slides` maps wsi_id to a local slide file; listed slides absent from it
    (or whose file is missing) are reported under "missing", not an error.
    A slide whose shard already exists is skipped. With `done_dir`, a marker
    `{done_dir}/{wsi_id}.json` (shard, pairs, sha256) is written for every
    finished slide. `out_dir/sizes.json` lists every finished shard of the
    JSON with its pair count (what open_clip's trainer reads).
    """
    out_dir = Path(out_dir)
    groups, duplicates = read_pathgen_json(json_path)
    written: list[str] = []
    skipped: list[str] = []
    missing: list[str] = []
    pairs_written = 0
    for wsi_id in sorted(groups):
        shard = out_dir / shard_name(wsi_id)
        if shard.is_file():
            skipped.append(wsi_id)
        elif wsi_id not in slides or not Path(slides[wsi_id]).is_file():
            missing.append(wsi_id)
            continue
        else:
            with Slide(slides[wsi_id], wsi_id) as slide:
                members = slide_members(slide, groups[wsi_id], patch_size, jpeg_quality)
            write_tar(members, shard)
            written.append(wsi_id)
            pairs_written += len(groups[wsi_id])
        marker = Path(done_dir) / f"{wsi_id}.json" if done_dir is not None else None
        if marker is not None and (wsi_id in written or not marker.is_file()):
            write_json({"wsi_id": wsi_id, "shard": shard.name, "pairs": len(groups[wsi_id]),
                        "sha256": sha256_file(shard)}, marker)
    sizes = {shard_name(w): len(groups[w]) for w in sorted(groups) if (out_dir / shard_name(w)).is_file()}
    if sizes:
        write_json(sizes, out_dir / "sizes.json")
    return {
        "pairs": sum(len(p) for p in groups.values()),
        "slides": len(groups),
        "duplicates_dropped": duplicates,
        "written": written,
        "skipped": skipped,
        "missing": missing,
        "pairs_written": pairs_written,
        "shards": sizes,
    }
