"""Import the released PathGen-1.6M JSON: cut its patches from local slides into WebDataset shards.

The released file is a JSON list of {"wsi_id", "position": ["X", "Y"],
"caption", "file_id"}: the WSI (a TCGA slide name), the level-0 top-left of a
672 × 672 px patch at the highest magnification, and its caption. For each
listed slide found locally this writes one shard `{wsi_id}.tar` with, per
pair, `{key}.jpg` (the patch), `{key}.txt` (the caption) and `{key}.json`
(provenance), key = `{wsi_id}/x{X:07d}_y{Y:07d}` as in assembled shards.

What cannot be cut is skipped and counted, never fatal, since a local TCGA
copy is usually partial: a malformed record, a position whose patch does not
lie fully inside level 0, and every record of a slide that is not in the
manifest, whose file is missing, or that OpenSlide cannot read. The run ends
with `sizes.json` (shard -> pairs, for every shard in the folder) and
`import-summary.json` (the returned summary); it is an error only when
nothing at all was imported or already present.

Resumable per slide: a slide whose shard exists is skipped; shards are
written atomically, so an interrupted slide leaves nothing and is redone.
Memory: one slide's encoded patches at a time.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from pathgen.errors import PathgenError, SlideError
from pathgen.interop.pathgen_json import RECORD_REASONS, Pair, read_pathgen_json
from pathgen.store.io import encode_jpeg, sha256_file, write_json, write_tar
from pathgen.store.shards import pair_key
from pathgen.wsi.slide import Slide

log = logging.getLogger(__name__)

SOURCE = "pathgen-1.6m"
SIZES_NAME = "sizes.json"
SUMMARY_NAME = "import-summary.json"
FIRST = 10  # slide ids quoted per reason in the summary

# Why a listed slide gets no shard.
SLIDE_REASONS = ("not_in_manifest", "file_missing", "unreadable", "nothing_inside")
# Why a record is not imported: the reader's reasons, then the cutter's. A slide skipped as a whole
# skips its records as "slide_<reason>"; those of a slide with nothing inside count as "outside_slide".
# A resumed slide's records missing from its shard (skipped by the run that wrote it, or listed by
# another JSON) are "not_in_resumed_shard".
SKIP_REASONS = RECORD_REASONS + ("outside_slide", "slide_not_in_manifest", "slide_file_missing", "slide_unreadable",
                                 "not_in_resumed_shard")
_SLIDE_WORDS = {"not_in_manifest": "not in the manifest", "file_missing": "with a missing file",
                "unreadable": "unreadable", "nothing_inside": "with no listed patch inside the slide"}


def shard_name(wsi_id: str) -> str:
    """File name of the shard holding `wsi_id`'s pairs."""
    return f"{wsi_id}.tar"


def inside(p: Pair, patch_size: int, width: int, height: int) -> bool:
    """Whether the `patch_size` px patch at `p` lies fully inside a `width` x `height` level 0."""
    return 0 <= p.x and 0 <= p.y and p.x + patch_size <= width and p.y + patch_size <= height


def slide_members(slide: Slide, pairs: list[Pair], patch_size: int,
                  jpeg_quality: int) -> tuple[dict[str, bytes], list[Pair]]:
    """The shard members of the pairs whose patch lies inside the slide, and the pairs whose patch does not."""
    width, height = slide.dimensions
    outside = [p for p in pairs if not inside(p, patch_size, width, height)]
    kept = [p for p in pairs if inside(p, patch_size, width, height)]
    members: dict[str, bytes] = {}
    for p in sorted(kept, key=lambda p: pair_key(slide.slide_id, p.x, p.y)):
        key = pair_key(slide.slide_id, p.x, p.y)
        image = slide.read_patch(p.x, p.y, 0, patch_size, patch_size)
        meta = {"wsi_id": slide.slide_id, "x": p.x, "y": p.y, "size": patch_size, "file_id": p.file_id, "source": SOURCE}
        members[f"{key}.jpg"] = encode_jpeg(image, jpeg_quality)
        members[f"{key}.txt"] = p.caption.encode("utf-8")
        members[f"{key}.json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return members, outside


def shard_keys(path: Path) -> set[str]:
    """The pairs of a WebDataset tar: its keys with a `.txt` member (only the headers are read)."""
    with tarfile.open(path, "r:") as tar:
        return {info.name[: -len(".txt")] for info in tar if info.isfile() and info.name.endswith(".txt")}


def folder_sizes(out_dir: Path, known: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Shard name -> pairs for every tar in `out_dir` (`known` for those just written), and the unreadable tars."""
    sizes: dict[str, int] = {}
    unreadable: list[str] = []
    for path in sorted(out_dir.glob("*.tar")) if out_dir.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.name in known:
            sizes[path.name] = known[path.name]
            continue
        try:
            sizes[path.name] = len(shard_keys(path))
        except (tarfile.TarError, OSError) as exc:
            log.warning("import: %s is not a readable tar, left out of %s: %s", path.name, SIZES_NAME, exc)
            unreadable.append(path.name)
    return sizes, unreadable


def _failure(summary: dict[str, Any], json_name: str) -> str:
    """Why nothing was imported, in one line."""
    records, slides = summary["records"], summary["slides"]
    if records["read"] == 0:
        return f"{json_name} lists no records"
    if slides["listed"] == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in records["skipped"].items() if n)
        return f"none of the {records['read']} records of {json_name} is well-formed ({reasons})"
    skipped = slides["skipped"]
    first = ", ".join(slides["missing_first"][:3])
    if skipped["not_in_manifest"]["count"] == slides["listed"]:
        return f"none of the {slides['listed']} listed slides is in the manifest (e.g. {first})"
    reasons = ", ".join(f"{s['count']} {_SLIDE_WORDS[r]}" for r, s in skipped.items() if s["count"])
    return f"none of the {slides['listed']} listed slides could be imported: {reasons} (e.g. {first})"


def import_pathgen_json(json_path: str | Path, slides: dict[str, Path], out_dir: str | Path, patch_size: int = 672,
                        jpeg_quality: int = 95, done_dir: str | Path | None = None) -> dict[str, Any]:
    """Cut the pairs of every locally present slide of a PathGen-1.6M JSON into `out_dir/{wsi_id}.tar`.

    `slides` maps wsi_id to a local slide file. What cannot be cut is skipped
    and counted by reason (module docstring). A slide whose shard already
    exists is skipped as resumed. With `done_dir`, a marker
    `{done_dir}/{wsi_id}.json` (shard, pairs, sha256) is written for every
    finished slide. Writes `out_dir/sizes.json` (every shard in the folder
    -> its pairs, what open_clip's trainer reads) and `out_dir/import-summary.json`
    (the returned summary: sorted keys, no paths, no times). PathgenError when
    no slide was imported or already present, after writing both.
    """
    json_path, out_dir = Path(json_path), Path(out_dir)
    listing = read_pathgen_json(json_path)
    skipped_records = dict.fromkeys(SKIP_REASONS, 0)
    skipped_records.update(listing.skipped)
    skipped_slides: dict[str, list[str]] = {r: [] for r in SLIDE_REASONS}
    imported: list[str] = []
    resumed: list[str] = []
    written: dict[str, int] = {}  # shard name -> pairs, for the shards written by this run
    known: dict[str, int] = {}  # shard name -> pairs, for every shard of this JSON read or written
    already_present = 0
    for wsi_id in sorted(listing.groups):
        pairs = listing.groups[wsi_id]
        shard = out_dir / shard_name(wsi_id)
        if shard.is_file():
            resumed.append(wsi_id)
            try:
                keys = shard_keys(shard)
                known[shard.name] = len(keys)
            except (tarfile.TarError, OSError):
                keys = set()  # left out of sizes.json and reported by folder_sizes
            present = sum(pair_key(wsi_id, p.x, p.y) in keys for p in pairs)
            already_present += present
            skipped_records["not_in_resumed_shard"] += len(pairs) - present
            continue
        reason = None
        if wsi_id not in slides:
            reason = "not_in_manifest"
        elif not Path(slides[wsi_id]).is_file():
            reason = "file_missing"
            log.warning("import %s: skipped, %d records: slide file %s not found", wsi_id, len(pairs), slides[wsi_id])
        else:
            try:
                with Slide(slides[wsi_id], wsi_id) as slide:
                    members, outside = slide_members(slide, pairs, patch_size, jpeg_quality)
                    dimensions = slide.dimensions
            except SlideError as exc:
                reason = "unreadable"
                log.warning("import %s: skipped, %d records: %s", wsi_id, len(pairs), exc)
            else:
                if outside:
                    skipped_records["outside_slide"] += len(outside)
                    log.warning("import %s: %d of %d positions skipped: a %d px patch there lies outside the slide "
                                "(%d x %d px at level 0), e.g. (%d, %d)", wsi_id, len(outside), len(pairs),
                                patch_size, *dimensions, outside[0].x, outside[0].y)
                if not members:
                    reason = "nothing_inside"
                else:
                    write_tar(members, shard)
                    written[shard.name] = known[shard.name] = len(pairs) - len(outside)
                    imported.append(wsi_id)
                    log.info("import %s: %d pairs", wsi_id, written[shard.name])
                del members
        if reason is not None:
            skipped_slides[reason].append(wsi_id)
            if reason != "nothing_inside":
                skipped_records[f"slide_{reason}"] += len(pairs)

    sizes, unreadable_tars = folder_sizes(out_dir, known)
    if done_dir is not None:
        for wsi_id in sorted(imported + resumed):
            shard, marker = out_dir / shard_name(wsi_id), Path(done_dir) / f"{wsi_id}.json"
            if shard.name in sizes and (shard.name in written or not marker.is_file()):
                write_json({"wsi_id": wsi_id, "shard": shard.name, "pairs": sizes[shard.name],
                            "sha256": sha256_file(shard)}, marker)
    missing = sorted(w for ids in skipped_slides.values() for w in ids)
    summary = {
        "json": json_path.name,
        "patch_size": patch_size,
        "jpeg_quality": jpeg_quality,
        "records": {
            "read": listing.records,
            "imported": sum(written.values()),
            "already_present": already_present,
            "skipped": skipped_records,
            "malformed_first": listing.examples,
        },
        "slides": {
            "listed": len(listing.groups),
            "imported": len(imported),
            "resumed": len(resumed),
            "missing": len(missing),
            "missing_first": missing[:FIRST],
            "skipped": {r: {"count": len(ids), "first": ids[:FIRST]} for r, ids in skipped_slides.items()},
        },
        "shards": {"count": len(sizes), "pairs": sum(sizes.values()), "unreadable": unreadable_tars},
    }
    write_json(sizes, out_dir / SIZES_NAME)
    write_json(summary, out_dir / SUMMARY_NAME)
    if skipped_slides["not_in_manifest"]:
        log.info("import: %d listed slides are not in the manifest, e.g. %s", len(skipped_slides["not_in_manifest"]),
                 ", ".join(skipped_slides["not_in_manifest"][:3]))
    if not imported and not resumed:
        raise PathgenError(f"nothing imported: {_failure(summary, json_path.name)} "
                           f"(counts in {out_dir / SUMMARY_NAME})")
    return summary
