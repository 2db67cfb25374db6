"""TCGA / GDC inputs: the manifest's file_id column, carried to the PathGen-1.6M export, and
`pathgen manifest gdc` (pathgen.interop.gdc) writing data/slides.tsv from a GDC sample sheet."""

from __future__ import annotations

import csv
import json
import logging
import uuid
from pathlib import Path

import pytest
from test_assemble import assemble_params, pair, write_inputs  # the synthetic upstream outputs assemble reads

from pathgen.cli import main
from pathgen.errors import ConfigError
from pathgen.interop.gdc import gdc_manifest, tcga_projects
from pathgen.steps.assemble import assemble_dataset
from pathgen.store.dataset import EXPORT_NAME
from pathgen.store.manifest import read_manifest
from pathgen.text.attributes import GENERIC, load_attribute_table, resolve_site

SHEET_HEADER = ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID",
                "Sample Type"]


def file_id(name: str) -> str:
    """A real-looking GDC file UUID (lower-case, 8-4-4-4-12), fixed per name."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"gdc:{name}"))


def slide_name(barcode: str) -> str:
    """A TCGA slide file name: barcode, the slide's upper-case UUID, .svs."""
    return f"{barcode}.{str(uuid.uuid5(uuid.NAMESPACE_DNS, barcode)).upper()}.svs"


def sheet_row(barcode: str, project: str, *, data_type: str = "Slide Image", name: str | None = None,
              fid: str | None = None) -> list[str]:
    case = barcode[:12]
    category = "Biospecimen" if data_type == "Slide Image" else "Clinical"
    name = name or slide_name(barcode)
    sample = barcode[:15] + "A" if len(barcode) > 12 else case  # TCGA-AA-3518-01A
    return [fid or file_id(name), name, category, data_type, project, case, sample, "Primary Tumor"]


def write_sheet(path: Path, rows: list[list[str]], header: list[str] = SHEET_HEADER) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def download(slides_dir: Path, row: list[str], flat: bool = False, data: bytes = b"II*\0 not really a slide") -> Path:
    """Put a stand-in slide file where gdc-client would (or flat): the command only checks it is there."""
    path = slides_dir / row[1] if flat else slides_dir / row[0] / row[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


COAD_DX = "TCGA-AA-3518-01Z-00-DX1"
COAD_TS = "TCGA-AA-3518-01A-01-TS1"
BRCA_DX = "TCGA-BH-A0BZ-01Z-00-DX1"
LUAD_DX = "TCGA-05-4244-01Z-00-DX1"
REPORT_TEXT = {
    "TCGA-AA-3518.0f4e9d2c-5c37-4d41-9a66-2b8cc4e1a3f7": "Colon, sigmoid: adenocarcinoma, moderately differentiated.\n",
    "TCGA-BH-A0BZ.9c1de8a4-77a2-4f5e-8b0d-0e3a6f2c91b5": "Breast, left: infiltrating ductal carcinoma, grade 2.",
    "TCGA-BH-A0BZ.1a2b3c4d-0000-4f5e-8b0d-0e3a6f2c91b5": "Addendum: HER2 immunostain negative (score 1+).",
    "TCGA-ZZ-0000.5e6f7a8b-1111-4222-8333-944455556666": "A case with no slide here.",
}


@pytest.fixture
def cohort(tmp_path) -> dict:
    """A sample sheet of four slides (one frozen section) and a pathology report PDF, downloaded, with a
    TCGA-Reports style CSV."""
    rows = [sheet_row(COAD_DX, "TCGA-COAD"), sheet_row(COAD_TS, "TCGA-COAD"), sheet_row(BRCA_DX, "TCGA-BRCA"),
            sheet_row(LUAD_DX, "TCGA-LUAD"),
            sheet_row("TCGA-AA-3518", "TCGA-COAD", data_type="Pathology Report",
                      name="TCGA-AA-3518.0F4E9D2C-5C37-4D41-9A66-2B8CC4E1A3F7.pdf")]
    slides_dir = tmp_path / "gdc"
    paths = {row[1].split(".")[0]: download(slides_dir, row, flat=row[1].startswith(LUAD_DX)) for row in rows[:4]}
    reports = tmp_path / "TCGA_Reports.csv"
    with open(reports, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_filename", "text"])
        writer.writerows(REPORT_TEXT.items())
    return {"sheet": write_sheet(tmp_path / "gdc_sample_sheet.2026-12-02.tsv", rows), "rows": rows,
            "slides_dir": slides_dir, "paths": paths, "reports": reports, "out": tmp_path / "data" / "slides.tsv",
            "reports_out": tmp_path / "data" / "tcga-reports"}


def run_gdc(c: dict, **kw):
    kw.setdefault("reports", c["reports"])
    return gdc_manifest(c["sheet"], c["slides_dir"], c["out"], reports_out=c["reports_out"], **kw)


# --- the manifest's file_id -------------------------------------------------------------------------------------------

def test_manifest_reads_file_id(tmp_path):
    fid = file_id("a")
    path = tmp_path / "slides.tsv"
    path.write_text(f"slide_id\tpath\ttissue\tfile_id\na\ta.svs\tlung\t{fid}\nb\tb.svs\tlung\t\n")
    a, b = read_manifest(path)
    assert (a.file_id, b.file_id) == (fid, None)


@pytest.mark.parametrize("cell, message", [
    (file_id("a").upper(), ":3: slide 'b' file_id '.*' is not a GDC file UUID"),
    (file_id("a")[:-1], ":3: slide 'b' file_id '.*' is not a GDC file UUID"),
    (file_id("a").replace("-", "_"), ":3: slide 'b' file_id '.*' is not a GDC file UUID"),
    (file_id("a"), f":3: slide 'b' file_id '{file_id('a')}' already used on line 2"),
], ids=["upper-case", "35-chars", "underscores", "duplicate"])
def test_manifest_rejects_a_bad_file_id_naming_the_row(tmp_path, cell, message):
    path = tmp_path / "slides.tsv"
    path.write_text(f"slide_id\tpath\ttissue\tfile_id\na\ta.svs\tlung\t{file_id('a')}\nb\tb.svs\tlung\t{cell}\n")
    with pytest.raises(ConfigError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_file_id_reaches_the_export(tmp_path, random_tiny_clip):
    """slides.tsv -> read_manifest -> the rule's --slides-json -> `pathgen assemble-shard` -> pathgen-1.6m.json."""
    fids = {COAD_DX: file_id(COAD_DX), BRCA_DX: file_id(BRCA_DX)}
    manifest = tmp_path / "slides.tsv"
    manifest.write_text("slide_id\tpath\ttissue\tproject\tfile_id\n"
                        f"{COAD_DX}\tc.svs\tcolon\tTCGA-COAD\t{fids[COAD_DX]}\n"
                        f"{BRCA_DX}\tb.svs\tbreast\tTCGA-BRCA\t{fids[BRCA_DX]}\n"
                        "local-01\tl.svs\tlung\t\t\n")
    entries = read_manifest(manifest)
    pairs = [pair(COAD_DX, 0, 0, tokens=9, description="a b", status="applied", cut=False),
             pair(BRCA_DX, 672, 0, tokens=9, description="c d", status="unchanged", cut=False),
             pair("local-01", 0, 1344, tokens=9, description="e f", status="applied", cut=False)]
    data, out = tmp_path / "data", tmp_path / "dataset"
    write_inputs(data, "00000", pairs, random_tiny_clip)
    slides_json = json.dumps([vars(e) for e in entries], sort_keys=True)  # rules/common.smk shard_entries_json
    assert main(["assemble-shard", "--shard", "00000", "--slides-json", slides_json, "--data-dir", str(data),
                 "--out-dir", str(out), "--params-json", json.dumps(assemble_params(random_tiny_clip))]) == 0
    assemble_dataset(out, ["00000"])
    export = json.loads((out / EXPORT_NAME).read_text())
    assert {r["wsi_id"]: r["file_id"] for r in export} == {**fids, "local-01": None}


# --- the TCGA project table ------------------------------------------------------------------------------------------

def test_project_table_has_every_tcga_project_with_a_tissue_the_prompts_know():
    projects = tcga_projects()
    assert len(projects) == 33 and all(p.startswith("TCGA-") for p in projects)
    table = load_attribute_table()
    for project, info in projects.items():
        site = resolve_site(table, info["tissue"], project)
        if project == "TCGA-LAML":  # bone marrow: no site of its own
            assert site == GENERIC
        else:
            assert info["tissue"] in table.sites, project
            assert table.aliases[project.lower()] == info["tissue"], project


# --- pathgen manifest gdc --------------------------------------------------------------------------------------------

def test_sample_sheet_to_a_manifest_read_manifest_reads(cohort, caplog):
    with caplog.at_level(logging.WARNING):
        summary = run_gdc(cohort)
    entries = read_manifest(cohort["out"])
    assert [e.slide_id for e in entries] == sorted([COAD_TS, COAD_DX, BRCA_DX, LUAD_DX])
    by_id = {e.slide_id: e for e in entries}
    rows = {r[1].split(".")[0]: r for r in cohort["rows"]}
    for slide_id, entry in by_id.items():
        assert Path(entry.path) == cohort["paths"][slide_id]
        assert entry.file_id == rows[slide_id][0]
        assert entry.mpp is None
    assert {s: (e.tissue, e.project) for s, e in by_id.items()} == {
        COAD_DX: ("colon", "TCGA-COAD"), COAD_TS: ("colon", "TCGA-COAD"), BRCA_DX: ("breast", "TCGA-BRCA"),
        LUAD_DX: ("lung", "TCGA-LUAD")}
    # the case's report, for each of its slides; the first of two by patient_filename; none for LUAD
    assert by_id[COAD_DX].report == by_id[COAD_TS].report == (cohort["reports_out"] / "TCGA-AA-3518.txt").as_posix()
    assert Path(by_id[COAD_DX].report).read_text() == REPORT_TEXT["TCGA-AA-3518.0f4e9d2c-5c37-4d41-9a66-2b8cc4e1a3f7"]
    assert Path(by_id[BRCA_DX].report).read_text() == REPORT_TEXT["TCGA-BH-A0BZ.1a2b3c4d-0000-4f5e-8b0d-0e3a6f2c91b5"]
    assert by_id[LUAD_DX].report is None
    assert sorted(p.name for p in cohort["reports_out"].iterdir()) == ["TCGA-AA-3518.txt", "TCGA-BH-A0BZ.txt"]
    assert "TCGA-BH-A0BZ: kept TCGA-BH-A0BZ.1a2b3c4d" in caplog.text
    assert (summary.slides, summary.projects, summary.not_slides, summary.not_diagnostic, summary.missing) == (
        4, 3, 1, 0, 0)
    assert (summary.reports_matched, summary.reports_unmatched, summary.report_cases, summary.several_reports) == (
        3, 1, 2, 1)


def test_cli_prints_one_summary_line_and_rerun_is_identical(cohort, capsys):
    argv = ["manifest", "gdc", str(cohort["sheet"]), "--slides-dir", str(cohort["slides_dir"]), "--reports",
            str(cohort["reports"]), "--reports-out", str(cohort["reports_out"]), "--out", str(cohort["out"]),
            "--diagnostic-only"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"pathgen manifest gdc: {cohort['out'].as_posix()}: wrote 3 slide(s) of 3 project(s); "
                     "left out: 1 not DX, 0 missing file(s), 1 not slide images; "
                     "reports: 2 slide(s) matched (2 case(s)), 1 unmatched, 1 case(s) with several reports "
                     "(first by name kept)"]
    assert [e.slide_id for e in read_manifest(cohort["out"])] == [LUAD_DX, COAD_DX, BRCA_DX]
    before = cohort["out"].read_bytes()
    assert main(argv) == 0  # same contents: no --force needed
    assert cohort["out"].read_bytes() == before
    assert main(argv[:-1]) == 2  # the TS slide too: other contents
    assert "exists with other contents; pass --force" in capsys.readouterr().err
    assert cohort["out"].read_bytes() == before
    assert main([*argv[:-1], "--force"]) == 0
    assert len(read_manifest(cohort["out"])) == 4


def test_append_keeps_the_existing_rows_first(cohort, tmp_path):
    first = write_sheet(tmp_path / "first.tsv", [cohort["rows"][i] for i in (2, 0)])  # BRCA, COAD DX
    run_gdc({**cohort, "sheet": first})
    before = cohort["out"].read_text()
    assert [e.slide_id for e in read_manifest(cohort["out"])] == [COAD_DX, BRCA_DX]
    summary = run_gdc(cohort, append=True)
    assert cohort["out"].read_text().startswith(before)
    assert [e.slide_id for e in read_manifest(cohort["out"])] == [COAD_DX, BRCA_DX, LUAD_DX, COAD_TS]
    assert (summary.slides, summary.already, summary.reports_matched, summary.reports_unmatched) == (2, 2, 1, 1)
    assert "added 2 slide(s) of 2 project(s) (2 already in it)" in summary.line()
    after = cohort["out"].read_text()
    assert run_gdc(cohort, append=True).slides == 0 and cohort["out"].read_text() == after

    cohort["out"].write_text(after.replace(cohort["rows"][1][0], file_id("another")))  # COAD_TS's file id
    with pytest.raises(ConfigError, match=rf":3: slide {COAD_TS} is file {cohort['rows'][1][0]}, but .* has it as "
                                          rf"file {file_id('another')}"):
        run_gdc(cohort, append=True)
    cohort["out"].write_text("slide_id\tpath\ttissue\na\ta.svs\tlung\n")
    with pytest.raises(ConfigError, match="--append needs the columns this command writes"):
        run_gdc(cohort, append=True)


def test_reports_from_a_folder_are_pointed_at(cohort, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "TCGA-AA-3518.report.txt").write_text("Colon: adenocarcinoma.")
    (folder / "TCGA-05-4244.txt").write_text("Lung: adenocarcinoma, acinar.")
    (folder / "TCGA-05-4244.pdf").write_bytes(b"%PDF-1.4")  # not a text report: not used
    summary = run_gdc(cohort, reports=folder)
    by_id = {e.slide_id: e for e in read_manifest(cohort["out"])}
    assert by_id[COAD_DX].report == (folder / "TCGA-AA-3518.report.txt").as_posix()
    assert by_id[LUAD_DX].report == (folder / "TCGA-05-4244.txt").as_posix()
    assert by_id[BRCA_DX].report is None
    assert (summary.reports_matched, summary.reports_unmatched) == (3, 1)
    assert not cohort["reports_out"].exists()


def test_gdc_client_manifest_with_project_and_sizes(tmp_path):
    slides_dir = tmp_path / "gdc"
    rows, sizes = [], {}
    for i, barcode in enumerate(["TCGA-AA-3518-01Z-00-DX1", "TCGA-AA-3520-01Z-00-DX1", "TCGA-AA-3521-01Z-00-DX1"]):
        name = slide_name(barcode)
        data = bytes(100 + i)
        path = slides_dir / file_id(name) / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data if i != 2 else data[:50])  # the third is an unfinished download
        sizes[barcode] = len(data)
        rows.append([file_id(name), name, "0" * 32, str(len(data)), "released"])
    rows.append([file_id("pdf"), "TCGA-AA-3518.0F4E9D2C.pdf", "0" * 32, "10", "released"])  # not a slide image
    sheet = write_sheet(tmp_path / "gdc_manifest.txt", rows, header=["id", "filename", "md5", "size", "state"])
    out = tmp_path / "slides.tsv"
    with pytest.raises(ConfigError, match=r"no Project ID column: pass the project of its files \(--project"):
        gdc_manifest(sheet, slides_dir, out)
    with pytest.raises(ConfigError, match="1 of 3 slide file.* missing .*first: .*:4 .*has 50 bytes, the manifest "
                                          "says 102"):
        gdc_manifest(sheet, slides_dir, out, project="TCGA-COAD")
    summary = gdc_manifest(sheet, slides_dir, out, project="TCGA-COAD", skip_missing=True)
    entries = read_manifest(out)
    assert [(e.slide_id, e.tissue, e.project, e.report) for e in entries] == [
        ("TCGA-AA-3518-01Z-00-DX1", "colon", "TCGA-COAD", None), ("TCGA-AA-3520-01Z-00-DX1", "colon", "TCGA-COAD", None)]
    assert (summary.slides, summary.missing, summary.not_slides) == (2, 1, 1)
    assert summary.line().endswith("reports: none given")


def test_missing_slides_are_an_error_or_left_out_with_a_warning(cohort, caplog):
    for slide_id in (COAD_TS, BRCA_DX):
        cohort["paths"][slide_id].unlink()
    with pytest.raises(ConfigError) as info:
        run_gdc(cohort)
    first = cohort["rows"][1]
    assert str(info.value) == (
        f"2 of 4 slide file(s) missing under {cohort['slides_dir']}; first: {cohort['sheet']}:3 file {first[0]} "
        f"{first[1]} (looked for {cohort['slides_dir'] / first[0] / first[1]} and {cohort['slides_dir'] / first[1]}); "
        "download them (gdc-client download -m ...) or pass --skip-missing")
    assert not cohort["out"].exists() and not cohort["reports_out"].exists()  # nothing written
    with caplog.at_level(logging.WARNING):
        summary = run_gdc(cohort, skip_missing=True)
    assert "2 of 4 slide file(s) missing" in caplog.text and "left out (--skip-missing)" in caplog.text
    assert [e.slide_id for e in read_manifest(cohort["out"])] == [LUAD_DX, COAD_DX]
    assert summary.missing == 2


def _bad(column: int, value: str, *more: tuple[int, str]):
    """Set cells of the sheet's third row (line 4: the BRCA slide)."""
    def edit(rows: list[list[str]]) -> None:
        for col, text in ((column, value), *more):
            rows[2][col] = text
    return edit


@pytest.mark.parametrize("edit, message", [
    (_bad(0, file_id("x").upper()), r":4: column File ID: '.*' is not a GDC file UUID"),
    (_bad(0, ""), r":4: column File ID: '' is not a GDC file UUID"),
    (_bad(1, "slide-0001.svs"), r":4: column File Name: 'slide-0001.svs' does not start with a TCGA slide barcode"),
    (_bad(4, "TCGA-FOO"), r":4: column Project ID: unknown project 'TCGA-FOO' \(slide TCGA-BH-A0BZ-01Z-00-DX1\); "
                          r"the TCGA projects are TCGA-ACC, TCGA-BLCA, .*, TCGA-UVM$"),
    (_bad(4, "CPTAC-3"), r":4: column Project ID: unknown project 'CPTAC-3'"),
    (_bad(5, "TCGA-BH-A0C0"), r":4: column Case ID: 'TCGA-BH-A0C0' is not the case of slide TCGA-BH-A0BZ-01Z-00-DX1"),
    (_bad(1, slide_name(COAD_DX).replace(".svs", ".v2.svs"), (4, "TCGA-COAD"), (5, "TCGA-AA-3518")),
     r":4: slide id TCGA-AA-3518-01Z-00-DX1 \(file .*\) already on line 2 \(file .*\): two files of one slide"),
])
def test_bad_sheet_rows_are_named(cohort, edit, message):
    rows = [list(r) for r in cohort["rows"]]
    edit(rows)
    if rows[2][1] != cohort["rows"][2][1]:
        download(cohort["slides_dir"], rows[2])
    write_sheet(cohort["sheet"], rows)
    with pytest.raises(ConfigError, match=message) as info:
        run_gdc(cohort)
    assert str(info.value).startswith(f"{cohort['sheet']}:4: ")
    assert not cohort["out"].exists()


@pytest.mark.parametrize("text, message", [
    ("patient_filename,text\nTCGA-AA-3518.x,ok\nslide 7,Colon.\n", r"TCGA_Reports.csv:3: column patient_filename "
                                                                  r"'slide 7' does not start with a TCGA case barcode"),
    ("patient_filename,text\nTCGA-AA-3518.x,\"multi\nline\"\nTCGA-AA-35180,x\n", r"TCGA_Reports.csv:4: column "
                                                                               "patient_filename 'TCGA-AA-35180'"),
    ("patient_filename,text\nTCGA-AA-3518.x,  \n", r"TCGA_Reports.csv:2: column text is empty"),
    ("case,report\nTCGA-AA-3518,x\n", r"TCGA_Reports.csv: reports CSV without column\(s\) patient_filename, text"),
])
def test_bad_report_csv_rows_are_named(cohort, text, message):
    cohort["reports"].write_text(text)
    with pytest.raises(ConfigError, match=message):
        run_gdc(cohort)
    assert not cohort["out"].exists()


def test_sheet_format_errors(cohort, tmp_path):
    with pytest.raises(ConfigError, match="--project is for gdc-client manifests"):
        run_gdc(cohort, project="TCGA-COAD")
    other = write_sheet(tmp_path / "other.tsv", [["a", "b"]], header=["slide", "file"])
    with pytest.raises(ConfigError, match=r"other.tsv: neither a GDC sample sheet .* have slide, file$"):
        gdc_manifest(other, cohort["slides_dir"], cohort["out"])
    with pytest.raises(ConfigError, match="nowhere: slides folder not found"):
        gdc_manifest(cohort["sheet"], tmp_path / "nowhere", cohort["out"])
    only_ts = write_sheet(tmp_path / "ts.tsv", [cohort["rows"][1]])
    with pytest.raises(ConfigError, match=r"ts.tsv: no slides left to write \(0 not slide images, 1 not diagnostic"):
        gdc_manifest(only_ts, cohort["slides_dir"], cohort["out"], diagnostic_only=True)
