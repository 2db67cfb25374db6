"""The released PathGen-1.6M JSON format: reading it (for the importer) and writing it (assemble's export).

A JSON list of {"wsi_id", "position": ["X", "Y"], "caption", "file_id"}: the
WSI (a TCGA slide name), the level-0 top-left of a 672 × 672 px patch at the
highest magnification, its caption, and the GDC file UUID of the slide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from pathgen.errors import PathgenError
from pathgen.store.io import write_text
from pathgen.store.manifest import SLIDE_ID


class Pair(NamedTuple):
    """One listed patch of a slide."""

    x: int
    y: int
    caption: str
    file_id: str | None


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


def pathgen_records(manifest: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows in the released PathGen-1.6M JSON format: wsi_id, position (two strings), caption, file_id."""
    return [
        {"wsi_id": slide_id, "position": [str(x), str(y)], "caption": summary, "file_id": file_id}
        for slide_id, x, y, summary, file_id in manifest.select("slide_id", "x", "y", "summary", "file_id").iter_rows()
    ]


def write_pathgen_json(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write records as a JSON list, one record per line (field order as released), atomically."""
    lines = [json.dumps(rec, ensure_ascii=False) for rec in records]
    write_text("[\n" + ",\n".join(lines) + ("\n" if lines else "") + "]\n", path)
