"""`pathgen manifest gdc`: the slide manifest (`data/slides.tsv`) of a TCGA download from the GDC.

Inputs:

- a GDC sample sheet (the portal's "Sample Sheet" TSV: File ID, File Name, Data Category,
  Data Type, Project ID, Case ID, Sample ID, Sample Type; extra columns are ignored) or a
  gdc-client manifest (id, filename, md5, size, state: it has no project, so `project` names
  the one project of all its files);
- the folder the slides were downloaded to: gdc-client's layout `<dir>/<file_id>/<file_name>`
  or a flat `<dir>/<file_name>`;
- optionally the pathology reports: a folder of `.txt` files whose names start with the
  12-character case barcode (TCGA-XX-XXXX), or a CSV with columns `patient_filename`, `text`
  (as the public TCGA-Reports collection has: `TCGA-AA-3518.<uuid>`).

One manifest row per slide image, sorted by slide id: the slide id is the TCGA barcode of the
file name (before the first '.', e.g. TCGA-AA-3518-01Z-00-DX1); tissue from the project
(`pathgen/resources/tcga_projects.yaml`, all 33 TCGA projects); project; file_id (the GDC
UUID, carried to the PathGen-1.6M export); mpp empty (read from the slide); report: a report
of the slide's case. Reports from a CSV are written one per case to `reports_out/<case>.txt`;
reports from a folder are pointed at where they are. A case with several reports keeps the
first by name (patient_filename or file name) and the others are named in a warning: the
choice never depends on file order.

Rows of other data types (or, in a gdc-client manifest, files that are no slide image) are
left out and counted; with `diagnostic_only` so are the slides whose type code is not DX
(frozen-section TS/BS/MS slides). Every other problem is an error naming the row and column:
a file id that is not a UUID, a file name without a TCGA slide barcode, an unknown project,
a Case ID that is not the barcode's case, two rows with one slide id. Missing slide files
(or, with a gdc-client manifest, files of the wrong size: unfinished downloads) are an error
naming how many and the first, or with `skip_missing` left out with a warning. Nothing is
written until everything has been checked; the manifest is written last.

Shards are consecutive slides of the manifest, so re-sorting a grown cohort would move slides
between shards and rerun their model jobs. With `append`, an existing manifest keeps its rows
as they are and the sheet's new slides are added after them (sorted among themselves).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pathgen.errors import ConfigError
from pathgen.store.io import write_text
from pathgen.store.manifest import FILE_ID, read_manifest

log = logging.getLogger(__name__)

SAMPLE_SHEET = ("File ID", "File Name", "Project ID")  # required of a sample sheet
GDC_MANIFEST = ("id", "filename")  # required of a gdc-client manifest (md5, size, state too)
SLIDE_IMAGE = "Slide Image"  # the GDC Data Type of whole-slide images
WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".bif")
CASE = r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}"
# TCGA slide barcode: case, sample + vial, portion, slide type (DX, TS, BS, MS) and order.
SLIDE_BARCODE = re.compile(rf"^({CASE})-\d{{2}}[A-Z]-\d{{2}}[A-Z]?-([A-Z]{{2}})[0-9A-Z]*$")
CASE_PREFIX = re.compile(rf"^({CASE})(?![A-Za-z0-9])")
DIAGNOSTIC = "DX"
COLUMNS = ("slide_id", "path", "tissue", "project", "mpp", "report", "file_id")


def tcga_projects() -> dict[str, dict[str, str]]:
    """The packaged table of TCGA projects: project id -> {name, tissue}."""
    text = resources.files("pathgen").joinpath("resources/tcga_projects.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["projects"]


@dataclass
class _Slide:
    line: int
    slide_id: str
    case: str
    project: str
    file_id: str
    path: str
    report: str | None = None


@dataclass
class GdcSummary:
    """What `gdc_manifest` wrote and left out."""

    out: str
    slides: int = 0
    projects: int = 0
    not_slides: int = 0  # rows of another data type / files that are no slide image
    not_diagnostic: int = 0  # left out by diagnostic_only
    missing: int = 0  # slide files not found (or unfinished), left out by skip_missing
    reports_matched: int = 0  # slides with a report
    reports_unmatched: int = 0  # slides without one (when reports were given)
    report_cases: int = 0  # cases whose report was used
    several_reports: int = 0  # of those, cases with more than one report (first by name kept)
    reports_given: bool = False
    already: int = 0  # with append: the sheet's slides already in the manifest (left as they are)
    appended: bool = False
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line summary the command prints."""
        wrote = (f"added {self.slides} slide(s) of {self.projects} project(s) ({self.already} already in it)"
                 if self.appended else f"wrote {self.slides} slide(s) of {self.projects} project(s)")
        text = (f"pathgen manifest gdc: {self.out}: {wrote}; left out: {self.not_diagnostic} not DX, "
                f"{self.missing} missing file(s), {self.not_slides} not slide images; ")
        if not self.reports_given:
            return text + "reports: none given"
        text += (f"reports: {self.reports_matched} slide(s) matched ({self.report_cases} case(s)), "
                 f"{self.reports_unmatched} unmatched")
        if self.several_reports:
            text += f", {self.several_reports} case(s) with several reports (first by name kept)"
        return text


def _read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a tab-separated file; blank lines skipped."""
    if not path.is_file():
        raise ConfigError(f"{path}: GDC sample sheet / manifest not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: empty; expected a GDC sample sheet or gdc-client manifest with a header line")
    header = [c.strip() for c in lines[0].split("\t")]
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != len(header):
            raise ConfigError(f"{path}:{line_no}: {len(cells)} tab-separated fields, the header has {len(header)}")
        rows.append((line_no, cells))
    return header, rows


def _sheet_kind(path: Path, header: list[str]) -> str:
    if all(c in header for c in ("File ID", "File Name")):
        missing = [c for c in SAMPLE_SHEET if c not in header]
        if missing:
            raise ConfigError(f"{path}: GDC sample sheet without column(s) {', '.join(missing)}")
        return "sample_sheet"
    if all(c in header for c in GDC_MANIFEST):
        return "gdc_manifest"
    raise ConfigError(f"{path}: neither a GDC sample sheet (columns {', '.join(SAMPLE_SHEET)}, ...) nor a "
                      f"gdc-client manifest (columns id, filename, md5, size, state); have {', '.join(header)}")


def _locate(slides_dir: Path, file_id: str, name: str, size: int | None) -> tuple[Path | None, str]:
    """(the slide file, "") or (None, why not): gdc-client's <dir>/<file_id>/<name>, then <dir>/<name>."""
    candidates = (slides_dir / file_id / name, slides_dir / name)
    for candidate in candidates:
        if candidate.is_file():
            actual = candidate.stat().st_size
            if size is not None and actual != size:
                return None, f"{candidate} has {actual} bytes, the manifest says {size} (unfinished download?)"
            return candidate, ""
    return None, f"looked for {candidates[0]} and {candidates[1]}"


def _report_candidates_from_dir(folder: Path) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """case -> [(name, path)] of the folder's .txt reports, and how many files were not used."""
    found: dict[str, list[tuple[str, str]]] = {}
    unused = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        match = CASE_PREFIX.match(path.name)
        if match is None or path.suffix.lower() != ".txt":
            unused += 1
            continue
        found.setdefault(match.group(1), []).append((path.name, path.as_posix()))
    return found, unused


def _report_candidates_from_csv(path: Path) -> dict[str, list[tuple[str, str]]]:
    """case -> [(patient_filename, text)] of a TCGA-Reports style CSV (columns patient_filename, text)."""
    found: dict[str, list[tuple[str, str]]] = {}
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a report is one field: longer than csv's 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in ("patient_filename", "text") if c not in header]
            if missing:
                raise ConfigError(f"{path}: reports CSV without column(s) {', '.join(missing)}; "
                                  f"have {', '.join(header) or 'none'}")
            name_at, text_at = header.index("patient_filename"), header.index("text")
            start = reader.line_num + 1
            for cells in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise ConfigError(f"{where}: {len(cells)} fields, the header has {len(header)}")
                name, text = cells[name_at].strip(), cells[text_at]
                match = CASE_PREFIX.match(name)
                if match is None or name[len(match.group(1)):][:1] not in ("", "."):
                    raise ConfigError(f"{where}: column patient_filename {name!r} does not start with a TCGA "
                                      "case barcode (TCGA-XX-XXXX, then '.' or nothing)")
                if not text.strip():
                    raise ConfigError(f"{where}: column text is empty (patient_filename {name!r})")
                found.setdefault(match.group(1), []).append((name, text))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ConfigError(f"{path}: not a readable CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)
    return found


def _read_sheet(sheet: Path, slides_dir: Path, project: str | None, diagnostic_only: bool,
                summary: GdcSummary) -> tuple[list[_Slide], list[tuple[int, str, str, str]]]:
    """The sheet's slides that are there, and the missing ones as (line, file_id, file name, why)."""
    header, rows = _read_tsv(sheet)
    kind = _sheet_kind(sheet, header)
    projects = tcga_projects()
    if kind == "gdc_manifest" and project is None:
        raise ConfigError(f"{sheet}: a gdc-client manifest has no Project ID column: pass the project of its "
                          "files (--project TCGA-XXXX), or use the portal's sample sheet")
    if kind == "sample_sheet" and project is not None:
        raise ConfigError(f"{sheet}: --project is for gdc-client manifests; this sample sheet has Project ID")
    col = {name: i for i, name in enumerate(header)}
    id_col, name_col = ("File ID", "File Name") if kind == "sample_sheet" else ("id", "filename")
    known = ", ".join(sorted(projects))

    slides: list[_Slide] = []
    missing: list[tuple[int, str, str, str]] = []
    seen: dict[str, tuple[int, str]] = {}
    for line, cells in rows:
        where = f"{sheet}:{line}"

        def cell(name: str) -> str | None:
            return cells[col[name]] if name in col and cells[col[name]] else None

        file_id, name = cell(id_col) or "", cell(name_col) or ""
        if not FILE_ID.match(file_id):
            raise ConfigError(f"{where}: column {id_col}: {file_id!r} is not a GDC file UUID "
                              "(36 characters: lower-case hex digits and dashes, 8-4-4-4-12)")
        data_type = cell("Data Type")
        if kind == "sample_sheet" and data_type is not None and data_type != SLIDE_IMAGE:
            summary.not_slides += 1
            continue
        if kind == "gdc_manifest" and not name.lower().endswith(WSI_SUFFIXES):
            summary.not_slides += 1
            continue
        slide_id = name.split(".", 1)[0]
        barcode = SLIDE_BARCODE.match(slide_id)
        if barcode is None:
            raise ConfigError(f"{where}: column {name_col}: {name!r} does not start with a TCGA slide barcode "
                              "(e.g. TCGA-AA-3518-01Z-00-DX1, then '.')")
        case, slide_type = barcode.group(1), barcode.group(2)
        row_project = project if kind == "gdc_manifest" else cell("Project ID") or ""
        if row_project not in projects:
            source = "--project" if kind == "gdc_manifest" else "column Project ID"
            raise ConfigError(f"{where}: {source}: unknown project {row_project!r} (slide {slide_id}); "
                              f"the TCGA projects are {known}")
        case_cell = cell("Case ID")
        if case_cell is not None and any(c.strip() != case for c in case_cell.split(",")):
            raise ConfigError(f"{where}: column Case ID: {case_cell!r} is not the case of slide {slide_id} ({case})")
        if diagnostic_only and slide_type != DIAGNOSTIC:
            summary.not_diagnostic += 1
            continue
        if slide_id in seen:
            first_line, first_id = seen[slide_id]
            raise ConfigError(f"{where}: slide id {slide_id} (file {file_id}) already on line {first_line} "
                              f"(file {first_id}): two files of one slide barcode")
        seen[slide_id] = (line, file_id)
        size_text = cell("size") if kind == "gdc_manifest" else None
        try:
            size = int(size_text) if size_text is not None else None
        except ValueError:
            raise ConfigError(f"{where}: column size: {size_text!r} is not a whole number of bytes") from None
        path, why = _locate(slides_dir, file_id, name, size)
        if path is None:
            missing.append((line, file_id, name, why))
            continue
        text = path.as_posix()
        if any(c in text for c in "\t\r\n"):
            raise ConfigError(f"{where}: slide file path {text!r} has a tab or line break, which a manifest cell "
                              "cannot hold")
        slides.append(_Slide(line, slide_id, case, row_project, file_id, text))
    return slides, missing


def _appended_to(out: Path, sheet: Path, slides: list[_Slide], summary: GdcSummary) -> list[str]:
    """The lines of the existing manifest `out`, header first; drops from `slides` those already in it."""
    lines = out.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    if header != list(COLUMNS):
        raise ConfigError(f"{out}: --append needs the columns this command writes ({', '.join(COLUMNS)}); "
                          f"have {', '.join(header) or 'none'}")
    existing = {e.slide_id: e for e in read_manifest(out)}
    by_file = {e.file_id: e.slide_id for e in existing.values() if e.file_id}
    new = []
    for s in slides:
        entry = existing.get(s.slide_id)
        if entry is not None and entry.file_id != s.file_id:
            raise ConfigError(f"{sheet}:{s.line}: slide {s.slide_id} is file {s.file_id}, but {out} has "
                              f"it as file {entry.file_id}")
        if entry is None and s.file_id in by_file:
            raise ConfigError(f"{sheet}:{s.line}: file {s.file_id} (slide {s.slide_id}) is already in "
                              f"{out} as slide {by_file[s.file_id]}")
        if entry is None:
            new.append(s)
    summary.appended, summary.already = True, len(slides) - len(new)
    slides[:] = new
    return lines


def gdc_manifest(sheet: str | Path, slides_dir: str | Path, out: str | Path, *, reports: str | Path | None = None,
                 reports_out: str | Path = "data/tcga-reports", diagnostic_only: bool = False,
                 skip_missing: bool = False, project: str | None = None, force: bool = False,
                 append: bool = False) -> GdcSummary:
    """Write the slide manifest `out` for the slides of a GDC sample sheet (or gdc-client manifest).

    Paths are written as given (`slides_dir`, `reports_out` relative to where the command runs,
    which for the pipeline is the project root). ConfigError (one line, naming the file and row)
    for bad input; an existing `out` with other contents is replaced only with `force`, or with
    `append` kept and added to.
    """
    sheet, slides_dir, out, reports_out = Path(sheet), Path(slides_dir), Path(out), Path(reports_out)
    summary = GdcSummary(out=out.as_posix(), reports_given=reports is not None)
    if not slides_dir.is_dir():
        raise ConfigError(f"{slides_dir}: slides folder not found (where gdc-client downloaded the slides)")
    slides, missing = _read_sheet(sheet, slides_dir, project, diagnostic_only, summary)
    if missing:
        line, file_id, name, why = missing[0]
        total = len(slides) + len(missing)
        message = (f"{len(missing)} of {total} slide file(s) missing under {slides_dir}; first: {sheet}:{line} "
                   f"file {file_id} {name} ({why})")
        if not skip_missing:
            raise ConfigError(f"{message}; download them (gdc-client download -m ...) or pass --skip-missing")
        log.warning("%s: left out (--skip-missing)", message)
        summary.missing = len(missing)
    if not slides:
        raise ConfigError(f"{sheet}: no slides left to write ({summary.not_slides} not slide images, "
                          f"{summary.not_diagnostic} not diagnostic, {summary.missing} missing)")

    kept = _appended_to(out, sheet, slides, summary) if append and out.exists() else []

    to_write: dict[Path, str] = {}
    if reports is not None:
        reports = Path(reports)
        if reports.is_dir():
            candidates, unused = _report_candidates_from_dir(reports)
            if unused:
                log.warning("%s: %d file(s) not used as reports (not .txt, or the name does not start with a "
                            "case barcode TCGA-XX-XXXX)", reports, unused)
        elif reports.is_file():
            candidates = _report_candidates_from_csv(reports)
        else:
            raise ConfigError(f"{reports}: reports folder or CSV not found")
        chosen: dict[str, str] = {}
        several: list[str] = []
        for case in sorted({s.case for s in slides} & set(candidates)):
            options = sorted(candidates[case])
            if len(options) > 1:
                several.append(f"{case}: kept {options[0][0]}, left out {', '.join(o[0] for o in options[1:])}")
            if reports.is_dir():
                chosen[case] = options[0][1]
            else:
                target = reports_out / f"{case}.txt"
                to_write[target] = options[0][1]
                chosen[case] = target.as_posix()
        if several:
            log.warning("%d case(s) with several reports, the first by name kept; e.g. %s", len(several), several[0])
        for slide in slides:
            slide.report = chosen.get(slide.case)
        summary.reports_matched = sum(1 for s in slides if s.report is not None)
        summary.reports_unmatched = len(slides) - summary.reports_matched
        summary.report_cases, summary.several_reports = len(chosen), len(several)

    slides.sort(key=lambda s: s.slide_id)
    tissues = tcga_projects()
    lines = kept or ["\t".join(COLUMNS)]
    for s in slides:
        row: dict[str, Any] = {"slide_id": s.slide_id, "path": s.path, "tissue": tissues[s.project]["tissue"],
                               "project": s.project, "mpp": "", "report": s.report or "", "file_id": s.file_id}
        lines.append("\t".join(str(row[c]) for c in COLUMNS))
    text = "\n".join(lines) + "\n"
    if out.exists() and not (force or append) and out.read_text(encoding="utf-8", errors="replace") != text:
        raise ConfigError(f"{out}: exists with other contents; pass --force to replace it")
    for target, report_text in sorted(to_write.items()):
        write_text(report_text, target)
    write_text(text, out)
    summary.slides = len(slides)
    summary.projects = len({s.project for s in slides})
    return summary
