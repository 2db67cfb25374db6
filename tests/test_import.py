"""`pathgen import-pathgen` against a partial local copy: skip and count what cannot be cut, import the rest."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pathgen.cli import main
from pathgen.demo.slides import rectangle_label_map, write_synthetic_slide
from pathgen.errors import PathgenError
from pathgen.interop.importer import SKIP_REASONS, import_pathgen_json
from pathgen.store.io import encode_jpeg, write_tar
from pathgen.store.shards import pair_key
from pathgen.wsi.slide import Slide

PATCH = 672
ABSENT = [f"TCGA-X{i:02d}" for i in range(8)]  # listed, not in the manifest


@pytest.fixture(scope="module")
def real_slide(tmp_path_factory) -> Path:
    """A small real Aperio slide (4096 x 3072 px at level 0)."""
    path = tmp_path_factory.mktemp("wsi") / "slide.svs"
    write_synthetic_slide(path, rectangle_label_map(6, 8, (1, 1, 5, 7), 2), cell_px=512, seed=1)
    return path


def rec(wsi_id, x, y, caption="c", file_id=None) -> dict:
    return {"wsi_id": wsi_id, "position": [str(x), str(y)], "caption": caption, "file_id": file_id}


INSIDE = {"TCGA-A": [(0, 0), (672, 1344), (3424, 2400)], "TCGA-B": [(1344, 672)]}  # (3424, 2400): the corner


@pytest.fixture
def partial(tmp_path, real_slide):
    """A released-format JSON over 13 slides, 8 of them absent here, and the manifest of the local copy."""
    records = [
        rec("TCGA-A", 0, 0, "a1", "file-a"), rec("TCGA-A", 3500, 0, "past the right edge"),
        rec("TCGA-A", 672, 1344, "a2", "file-a"), rec("TCGA-A", -1, 0, "negative"),
        rec("TCGA-A", 3424, 2400, "a3, the corner ±1 µm", "file-a"), rec("TCGA-A", 0, 2401, "one px too low"),
        {"wsi_id": "TCGA-A", "position": ["12", "x"], "caption": "bad position"},
        rec("TCGA-B", 1344, 672, "b1"), rec("TCGA-B", 1344, 672, "b1 again"),
        {"wsi_id": "TCGA-B", "position": ["0", "0"]},  # no caption
        rec("TCGA-GONE", 0, 0), rec("TCGA-GONE", 672, 0),
        rec("TCGA-BAD", 0, 0),
        rec("TCGA-EDGE", 4000, 0),
    ] + [rec(w, 672 * i, 0) for w in ABSENT for i in range(2)]
    listing = tmp_path / "PathGen-1.6M.json"
    listing.write_text(json.dumps(records, ensure_ascii=False))
    unreadable = tmp_path / "bad.svs"
    unreadable.write_text("not a slide")
    slides = {"TCGA-A": real_slide, "TCGA-B": real_slide, "TCGA-GONE": tmp_path / "gone.svs",
              "TCGA-BAD": unreadable, "TCGA-EDGE": real_slide}
    return listing, slides


def skips(**counts) -> dict:
    return {r: counts.get(r, 0) for r in SKIP_REASONS}


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_import_skips_and_counts_what_it_cannot_cut(tmp_path, partial, real_slide, caplog):
    listing, slides = partial
    out = tmp_path / "imported"
    write_tar({"TCGA-OLD/x0000000_y0000000.txt": b"o1", "TCGA-OLD/x0000000_y0000000.jpg": b"",
               "TCGA-OLD/x0000672_y0000000.txt": b"o2", "TCGA-OLD/x0000672_y0000000.jpg": b""},
              out / "TCGA-OLD.tar")  # a shard of an earlier run, not listed by this JSON
    summary = import_pathgen_json(listing, slides, out)

    assert summary["records"] == {
        "read": 30, "imported": 4, "already_present": 0,
        "skipped": skips(bad_position=1, missing_caption=1, duplicate_position=1, outside_slide=4,
                         slide_not_in_manifest=16, slide_file_missing=2, slide_unreadable=1),
        "malformed_first": ["record 6 (wsi_id 'TCGA-A'): position must hold two integers, got ['12', 'x']",
                            "record 9 (wsi_id 'TCGA-B'): caption must be a non-empty string"],
    }
    r = summary["records"]
    assert r["read"] == r["imported"] + r["already_present"] + sum(r["skipped"].values())
    assert summary["slides"] == {
        "listed": 13, "imported": 2, "resumed": 0, "missing": 11,
        "missing_first": sorted(["TCGA-BAD", "TCGA-EDGE", "TCGA-GONE"] + ABSENT)[:10],
        "skipped": {"not_in_manifest": {"count": 8, "first": ABSENT},
                    "file_missing": {"count": 1, "first": ["TCGA-GONE"]},
                    "unreadable": {"count": 1, "first": ["TCGA-BAD"]},
                    "nothing_inside": {"count": 1, "first": ["TCGA-EDGE"]}},
    }
    assert summary["shards"] == {"count": 3, "pairs": 6, "unreadable": []}
    assert "TCGA-A: 3 of 6 positions skipped" in caplog.text and "TCGA-BAD: skipped, 1 records" in caplog.text

    assert sorted(p.name for p in out.iterdir()) == [
        "TCGA-A.tar", "TCGA-B.tar", "TCGA-OLD.tar", "import-summary.json", "sizes.json"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"TCGA-A.tar": 3, "TCGA-B.tar": 1, "TCGA-OLD.tar": 2}
    for name, n in sizes.items():
        assert sum(m.endswith(".txt") for m, _ in members(out / name)) == n
    assert json.loads((out / "import-summary.json").read_text()) == summary

    captions = {("TCGA-A", 0, 0): "a1", ("TCGA-A", 672, 1344): "a2", ("TCGA-A", 3424, 2400): "a3, the corner ±1 µm",
                ("TCGA-B", 1344, 672): "b1"}
    with Slide(real_slide, "direct") as slide:
        for wsi_id, positions in INSIDE.items():
            expected = []
            for x, y in sorted(positions):
                key = pair_key(wsi_id, x, y)
                meta = json.loads(dict(members(out / f"{wsi_id}.tar"))[f"{key}.json"])
                assert meta == {"wsi_id": wsi_id, "x": x, "y": y, "size": PATCH, "source": "pathgen-1.6m",
                                "file_id": "file-a" if wsi_id == "TCGA-A" else None}
                jpg = encode_jpeg(slide.read_region(x, y, 0, PATCH, PATCH), 95)
                meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
                expected += [(f"{key}.jpg", jpg), (f"{key}.json", meta_bytes),
                             (f"{key}.txt", captions[(wsi_id, x, y)].encode())]
            assert members(out / f"{wsi_id}.tar") == expected

    # Rerun: the imported slides are resumed untouched; the rest is tried and skipped again.
    tars = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    again = import_pathgen_json(listing, slides, out)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")} == tars
    assert again["records"]["already_present"] == 4 and again["records"]["imported"] == 0
    assert again["records"]["skipped"] == skips(
        bad_position=1, missing_caption=1, duplicate_position=1, outside_slide=1, not_in_resumed_shard=3,
        slide_not_in_manifest=16, slide_file_missing=2, slide_unreadable=1)
    assert (again["slides"]["imported"], again["slides"]["resumed"], again["slides"]["missing"]) == (0, 2, 11)
    assert json.loads((out / "sizes.json").read_text()) == sizes
    assert json.loads((out / "import-summary.json").read_text()) == again


def test_import_summary_is_deterministic_and_has_no_paths(tmp_path, partial):
    listing, slides = partial
    texts = []
    for name in ("one", "two"):
        import_pathgen_json(listing, slides, tmp_path / name)
        texts.append((tmp_path / name / "import-summary.json").read_text())
    assert texts[0] == texts[1]
    assert str(tmp_path) not in texts[0] and "/" not in texts[0]
    assert list(json.loads(texts[0])) == sorted(json.loads(texts[0]))


def test_cli_prints_the_summary_and_exits_0(tmp_path, partial, capsys):
    listing, slides = partial
    manifest = tmp_path / "slides.tsv"
    manifest.write_text("slide_id\tpath\ttissue\n" + "".join(f"{w}\t{p}\tcolon\n" for w, p in slides.items()))
    out = tmp_path / "out"
    assert main(["import-pathgen", str(listing), "--manifest", str(manifest), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "import-summary.json").read_text())
    assert (printed["slides"]["imported"], printed["records"]["imported"]) == (2, 4)


@pytest.mark.parametrize("records, slides, message", [
    ([rec(w, 0, 0) for w in ABSENT[:3]] + [rec(ABSENT[0], 672, 0)], {},
     r"nothing imported: none of the 3 listed slides is in the manifest \(e\.g\. TCGA-X00, TCGA-X01, TCGA-X02\)"),
    ([rec("TCGA-GONE", 0, 0), rec("TCGA-EDGE", 5000, 0), rec("TCGA-X00", 0, 0)],
     {"TCGA-GONE": "gone.svs", "TCGA-EDGE": "SLIDE"},
     r"none of the 3 listed slides could be imported: 1 not in the manifest, 1 with a missing file, "
     r"1 with no listed patch inside the slide"),
    ([{"wsi_id": "W", "position": ["0"], "caption": "c"}, {"wsi_id": "W", "position": ["0", "0"]}], {},
     r"none of the 2 records of PathGen-1\.6M\.json is well-formed \(1 missing_caption, 1 bad_position\)"),
    ([], {}, r"PathGen-1\.6M\.json lists no records"),
])
def test_import_of_nothing_is_one_clear_error(tmp_path, real_slide, records, slides, message):
    listing = tmp_path / "PathGen-1.6M.json"
    listing.write_text(json.dumps(records))
    slides = {w: real_slide if p == "SLIDE" else tmp_path / p for w, p in slides.items()}
    with pytest.raises(PathgenError, match=message):
        import_pathgen_json(listing, slides, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))


def test_cli_import_of_nothing_exits_2_with_one_line(tmp_path, capsys):
    listing = tmp_path / "PathGen-1.6M.json"
    listing.write_text(json.dumps([rec(w, 0, 0) for w in ABSENT]))
    manifest = tmp_path / "slides.tsv"
    manifest.write_text("slide_id\tpath\ttissue\nOTHER\tother.svs\tcolon\n")
    assert main(["import-pathgen", str(listing), "--manifest", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pathgen import-pathgen: error: nothing imported: none of the 8 listed slides "
                              "is in the manifest (e.g. TCGA-X00, TCGA-X01, TCGA-X02)")
    for text in ('{"wsi_id": "W"}', "[{"):
        listing.write_text(text)
        assert main(["import-pathgen", str(listing), "--manifest", str(manifest), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"pathgen import-pathgen: error: {listing}: ")
