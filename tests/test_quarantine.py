"""Slide-level isolation without Snakemake: the slide steps' status records, quarantine vs fail, the
quarantine passed on to later steps, and the dataset assembled with failures and incomplete shards."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import ROOT
from test_assemble import PAIRS, SLIDES, assemble_params, write_inputs

from pathgen.cli import main
from pathgen.config import step_params_json
from pathgen.steps.assemble import assemble_dataset, assemble_shard
from pathgen.steps.tile import GRID_SCHEMA
from pathgen.store.embeddings import read_embeddings
from pathgen.store.io import read_tar
from pathgen.store.status import record, run_summary, write_status


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tile(tmp_path, params, wsi, *extra):
    out = tmp_path / "out"
    argv = ["tile", str(wsi), "--slide-id", "bad", "--params-json", step_params_json(params, "tile"),
            "--grid", str(out / "g.parquet"), "--thumbnail", str(out / "t.png"), "--info", str(out / "i.json"), *extra]
    return main(argv), out


def test_an_unreadable_slide_is_quarantined_with_empty_outputs(tmp_path, params, capsys):
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide\n")
    code, out = tile(tmp_path, params, notes, "--status", str(tmp_path / "s.json"), "--on-slide-error", "quarantine")
    assert code == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"pathgen tile: quarantined: slide 'bad' ({notes}): not a slide format OpenSlide can read"
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec == {"slide_id": "bad", "status": "quarantined", "step": "tile",
                   "reason": f"slide 'bad' ({notes}): not a slide format OpenSlide can read"}
    grid = pl.read_parquet(out / "g.parquet")
    assert grid.height == 0 and grid.schema == pl.Schema(GRID_SCHEMA)
    assert json.loads((out / "i.json").read_text())["patches"] == 0


def test_on_slide_error_fail_exits_2_and_writes_no_record(tmp_path, params, capsys):
    code, out = tile(tmp_path, params, tmp_path / "missing.svs", "--status", str(tmp_path / "s.json"),
                     "--on-slide-error", "fail")
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("file not found")
    assert not (tmp_path / "s.json").exists() and not (out / "g.parquet").exists()


def test_a_quarantine_is_passed_on_without_touching_the_slide(tmp_path, params):
    upstream = tmp_path / "embed.status.json"
    write_status(record("bad", "tile", "slide 'bad' (x.svs): file not found"), upstream)
    status = tmp_path / "select.status.json"
    # The slide path does not exist: a step that opened it would fail.
    code = main(["embed", str(tmp_path / "x.svs"), "--slide-id", "bad", "--params-json",
                 step_params_json(params, "embed"), "--grid", str(tmp_path / "g.parquet"),
                 "--out", str(tmp_path / "e.zarr"), "--after", str(upstream), "--status", str(status),
                 "--on-slide-error", "quarantine", "--no-progress"])
    assert code == 0
    features, _, attrs = read_embeddings(tmp_path / "e.zarr")
    assert features.shape == (0, 0) and attrs["quarantined"].endswith("file not found")
    code = main(["patches", str(tmp_path / "x.svs"), "--slide-id", "bad", "--params-json",
                 step_params_json(params, "patches"), "--selection", str(tmp_path / "none.parquet"),
                 "--out", str(tmp_path / "p.tar"), "--after", str(status), "--status", str(status)])
    assert code == 0 and read_tar(tmp_path / "p.tar") == {}
    assert json.loads(status.read_text())["step"] == "tile"  # where it happened, not where it was passed on


def test_assemble_names_quarantined_slides_and_incomplete_shards(tmp_path, random_tiny_clip):
    data, out = tmp_path / "data", tmp_path / "out"
    for shard, pairs in PAIRS.items():
        write_inputs(data, shard, pairs, random_tiny_clip)
    reason = "slide 'A.DX1.ab12' (slides/x.svs): cannot read region at (0, 0) level 0: Premature end of JPEG file"
    write_status(record("A.DX1.ab12", "embed", reason), data / "patches" / "A.DX1.ab12.status.json")
    write_status(record("A", "patches"), data / "patches" / "A.status.json")
    assemble_shard("00000", SLIDES["00000"], data, out, assemble_params(random_tiny_clip))
    metrics = assemble_dataset(out, ["00000", "00001"], {"00001": "its caption job did not complete"})
    assert (metrics["complete"], metrics["incomplete_shards"], metrics["slides_quarantined"]) == (False, ["00001"], 1)
    assert (out / "failures.tsv").read_text() == (
        "shard\tslide_id\tstep\treason\n"
        f"00000\tA.DX1.ab12\tembed\t{reason}\n"
        "00001\t\tshard\tits caption job did not complete\n")
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": len(PAIRS["00000"])}
    with pytest.raises(Exception, match="shard 00001"):
        assemble_dataset(out, ["00000", "00001"])  # without the incomplete mark a missing shard is an error


def test_run_summary_lists_quarantined_slides(tmp_path):
    data = tmp_path / "data"
    write_status(record("S1", "patches"), data / "patches" / "S1.status.json")
    write_status(record("S2", "prompts", "report r.txt for slide S2 contains NUL bytes"),
                 data / "patches" / "S2.status.json")
    write_status(record("S3", "tile", "slide 'S3' (s3.svs): file not found"), data / "tiles" / "S3.status.json")
    text = run_summary(["S1", "S2", "S3"], data, {"00002": "its revise job did not complete"})
    assert text.splitlines() == [
        f"pathgen: 2 of 3 slide(s) quarantined (listed in {Path(data) / 'dataset' / 'failures.tsv'}):",
        "  S2 [prompts]: report r.txt for slide S2 contains NUL bytes",
        "  S3 [tile]: slide 'S3' (s3.svs): file not found",
        "pathgen: shard 00002 left out of the dataset: its revise job did not complete",
    ]
