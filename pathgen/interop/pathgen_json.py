"""The released PathGen-1.6M JSON format: reading it (for the importer) and writing it (assemble's export).

A JSON list of {"wsi_id", "position": ["X", "Y"], "caption", "file_id"}: the
WSI (a TCGA slide name), the level-0 top-left of a 672 × 672 px patch at the
highest magnification, its caption, and the GDC file UUID of the slide.
Reading skips malformed records and counts them by reason; only a file that
is not a JSON list at all is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import polars as pl

from pathgen.errors import PathgenError
from pathgen.store.io import atomic_path
from pathgen.store.manifest import SLIDE_ID


class Pair(NamedTuple):
    """One listed patch of a slide."""

    x: int
    y: int
    caption: str
    file_id: str | None


# Why a record is skipped, in the order they are checked.
RECORD_REASONS = ("not_an_object", "bad_wsi_id", "missing_caption", "bad_file_id", "bad_position", "duplicate_position")
EXAMPLES = 5  # malformed records quoted (index and reason) per read


class Listing(NamedTuple):
    """A read PathGen JSON: its well-formed pairs by slide and what was left out."""

    groups: dict[str, list[Pair]]  # wsi_id -> its pairs, file order, duplicate positions dropped
    records: int  # records in the file
    skipped: dict[str, int]  # reason (RECORD_REASONS) -> records left out for it
    examples: list[str]  # the first EXAMPLES malformed records, as "record N (wsi_id 'W'): why"


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(value)
    return int(value)


def _position(value: Any) -> tuple[int, int] | str:
    """(x, y), or why `value` is not a position."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return f"position must be a list of two numbers, got {value!r}"
    try:
        x, y = (_integer(v) for v in value)
    except ValueError:
        return f"position must hold two integers, got {value!r}"
    return x, y


def _check(rec: Any) -> tuple[str, Pair] | tuple[str, str]:
    """(wsi_id, its Pair) for a well-formed record, else (reason, why: "(wsi_id 'W'): ..." or ": ...")."""
    if not isinstance(rec, dict):
        return "not_an_object", f": expected an object, got {type(rec).__name__}"
    wsi_id, caption, file_id = rec.get("wsi_id"), rec.get("caption"), rec.get("file_id")
    if not isinstance(wsi_id, str) or not SLIDE_ID.match(wsi_id):
        return "bad_wsi_id", f": wsi_id {wsi_id!r} must match {SLIDE_ID.pattern}"
    where = f" (wsi_id '{wsi_id}'): "
    if not isinstance(caption, str) or not caption.strip():
        return "missing_caption", f"{where}caption must be a non-empty string"
    if file_id is not None and not isinstance(file_id, str):
        return "bad_file_id", f"{where}file_id must be a string or null, got {file_id!r}"
    position = _position(rec.get("position"))
    if isinstance(position, str):
        return "bad_position", where + position
    return wsi_id, Pair(position[0], position[1], caption, file_id)


def read_pathgen_json(json_path: str | Path) -> Listing:
    """The well-formed pairs of a PathGen JSON, grouped by slide; malformed records are skipped and counted.

    PathgenError (one line) only when the file as a whole is not the format:
    missing, not JSON, or not a JSON list.
    """
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
    skipped = dict.fromkeys(RECORD_REASONS, 0)
    examples: list[str] = []
    for index, rec in enumerate(records):
        key, checked = _check(rec)
        if isinstance(checked, str):
            skipped[key] += 1
            if len(examples) < EXAMPLES:
                examples.append(f"record {index}{checked}")
            continue
        pairs = groups.setdefault(key, {})
        if (checked.x, checked.y) in pairs:
            skipped["duplicate_position"] += 1
            continue
        pairs[(checked.x, checked.y)] = checked
    count = len(records)
    del records
    return Listing({wsi_id: list(pairs.values()) for wsi_id, pairs in groups.items()}, count, skipped, examples)


EXPORT_COLUMNS = ("slide_id", "x", "y", "summary", "file_id")  # the manifest columns a record is made of


def pathgen_records(frames: pl.DataFrame | Iterable[pl.DataFrame]) -> Iterator[dict[str, Any]]:
    """Rows in the released PathGen-1.6M JSON format: wsi_id, position (two strings), caption, file_id.

    From a manifest frame, or from an iterable of them (e.g. its parts, read one at a time), lazily.
    """
    for frame in [frames] if isinstance(frames, pl.DataFrame) else frames:
        for slide_id, x, y, summary, file_id in frame.select(EXPORT_COLUMNS).iter_rows():
            yield {"wsi_id": slide_id, "position": [str(x), str(y)], "caption": summary, "file_id": file_id}


def write_pathgen_json(records: Iterable[dict[str, Any]], path: str | Path, batch: int = 4096) -> None:
    """Write records as a JSON list, one record per line (field order as released), atomically.

    Streams: records are encoded and written `batch` at a time, never held all at once. The file is
    "[", the records joined by ",<newline>", "]", each bracket on its own line.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write("[\n")
            lines: list[str] = []
            first = True
            for rec in records:
                lines.append(json.dumps(rec, ensure_ascii=False))
                if len(lines) == batch:
                    fh.write(("" if first else ",\n") + ",\n".join(lines))
                    first, lines = False, []
            if lines:
                fh.write(("" if first else ",\n") + ",\n".join(lines))
                first = False
            fh.write(("" if first else "\n") + "]\n")
