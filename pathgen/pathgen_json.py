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
from typing import Any, NamedTuple

from pathgen.errors import PathgenError
from pathgen.io import encode_jpeg, sha256_file, write_json, write_tar
from pathgen.manifest import SLIDE_ID
from pathgen.shards import pair_key
from pathgen.slide import Slide

SOURCE = "pathgen-1.6m"


class Pair(NamedTuple):
    """One listed patch of a slide."""

    x: int
    y: int
    caption: str
    file_id: str | None


def shard_name(wsi_id: str) -> str:
    """File name of the shard holding `wsi_id`'s pairs."""
    return f"{wsi_id}.tar"


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(value)
    return int(value)


def _position(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PathgenError(f"{where}: position must be a list of two numbers, got {value!r}")
    try:
        x, y = (_integer(v) for v in value)
    except ValueError:
        raise PathgenError(f"{where}: position must hold two integers, got {value!r}") from None
    return x, y


def read_pathgen_json(json_path: str | Path) -> tuple[dict[str, list[Pair]], int]:
    """wsi_id -> its pairs (file order, duplicate positions dropped), and the number of duplicates dropped."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise PathgenError(f"{json_path}: PathGen JSON not found")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PathgenError(f"{json_path}: not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise PathgenError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    groups: dict[str, dict[tuple[int, int], Pair]] = {}
    duplicates = 0
    for index, rec in enumerate(records):
        where = f"{json_path}: record {index}"
        if not isinstance(rec, dict):
            raise PathgenError(f"{where}: expected an object, got {type(rec).__name__}")
        wsi_id, caption, file_id = rec.get("wsi_id"), rec.get("caption"), rec.get("file_id")
        if not isinstance(wsi_id, str) or not SLIDE_ID.match(wsi_id):
            raise PathgenError(f"{where}: wsi_id {wsi_id!r} must match {SLIDE_ID.pattern}")
        where = f"{where} (wsi_id '{wsi_id}')"
        if not isinstance(caption, str) or not caption.strip():
            raise PathgenError(f"{where}: caption must be a non-empty string")
        if file_id is not None and not isinstance(file_id, str):
            raise PathgenError(f"{where}: file_id must be a string or null, got {file_id!r}")
        x, y = _position(rec.get("position"), where)
        pairs = groups.setdefault(wsi_id, {})
        if (x, y) in pairs:
            duplicates += 1
            continue
        pairs[(x, y)] = Pair(x, y, caption, file_id)
    return {wsi_id: list(pairs.values()) for wsi_id, pairs in groups.items()}, duplicates


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
