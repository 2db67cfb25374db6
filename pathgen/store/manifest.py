"""The slide manifest (`data/slides.tsv`): one row per whole-slide image.

Columns: slide_id, path, tissue (required); project, mpp, report, file_id
(optional, empty cells mean none). Paths are relative to the project root
(where Snakemake runs) or absolute. file_id is the slide's GDC file UUID (as
the released PathGen-1.6M JSON carries it); `pathgen manifest gdc` fills it in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pathgen.errors import ConfigError

REQUIRED = ("slide_id", "path", "tissue")
OPTIONAL = ("project", "mpp", "report", "file_id")
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A GDC file UUID as the portal and gdc-client write it: 36 characters, lower-case hex, 8-4-4-4-12.
FILE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row."""

    slide_id: str
    path: str
    tissue: str
    project: str | None = None
    mpp: float | None = None
    report: str | None = None
    file_id: str | None = None  # GDC file UUID


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def read_manifest(path: str | Path) -> list[SlideEntry]:
    """Read and check the manifest; ConfigError names the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: slide manifest not found (params.yaml key 'manifest')")
    try:
        frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None, comment_prefix="#")
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable tab-separated table: {exc}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(frame.columns)}")
    unknown = [c for c in frame.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise ConfigError(f"{path}: unknown column(s) {', '.join(unknown)}")

    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    seen_files: dict[str, int] = {}
    for row_no, row in enumerate(frame.iter_rows(named=True), start=2):
        where = f"{path}:{row_no}"
        slide_id = _clean(row["slide_id"])
        if slide_id is None or not SLIDE_ID.match(slide_id):
            raise ConfigError(f"{where}: slide_id {row['slide_id']!r} must match {SLIDE_ID.pattern}")
        if slide_id in seen:
            raise ConfigError(f"{where}: slide_id '{slide_id}' already used on line {seen[slide_id]}")
        seen[slide_id] = row_no
        for column in ("path", "tissue"):
            if _clean(row[column]) is None:
                raise ConfigError(f"{where}: slide '{slide_id}' has an empty '{column}'")
        mpp_text = _clean(row.get("mpp"))
        mpp = None
        if mpp_text is not None:
            try:
                mpp = float(mpp_text)
            except ValueError:
                raise ConfigError(f"{where}: slide '{slide_id}' mpp {mpp_text!r} is not a number") from None
            if not mpp > 0:
                raise ConfigError(f"{where}: slide '{slide_id}' mpp must be > 0, got {mpp_text}")
        file_id = _clean(row.get("file_id"))
        if file_id is not None:
            if not FILE_ID.match(file_id):
                raise ConfigError(f"{where}: slide '{slide_id}' file_id {file_id!r} is not a GDC file UUID "
                                  "(36 characters: lower-case hex digits and dashes, 8-4-4-4-12)")
            if file_id in seen_files:
                raise ConfigError(f"{where}: slide '{slide_id}' file_id '{file_id}' already used on line "
                                  f"{seen_files[file_id]}")
            seen_files[file_id] = row_no
        entries.append(
            SlideEntry(
                slide_id=slide_id,
                path=_clean(row["path"]),
                tissue=_clean(row["tissue"]),
                project=_clean(row.get("project")),
                mpp=mpp,
                report=_clean(row.get("report")),
                file_id=file_id,
            )
        )
    return entries
