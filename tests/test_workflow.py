"""The Snakemake workflow for real: builds, incremental reruns, bad input (subprocess, tmp dirs)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time

import numpy as np
import open_clip
import polars as pl
import pytest
import webdataset as wds
import yaml
from conftest import BIN, planned_jobs, run, snakemake, train_open_clip
from PIL import Image

from pathgen.demo.slides import write_synthetic_slide
from pathgen.store.embeddings import read_embeddings
from pathgen.store.manifest import read_manifest

pytestmark = pytest.mark.workflow
STEPS = ("embed", "select")  # slide-side jobs: tile+embed, prompts+select+patches
SHARD_STEPS = ("caption", "revise", "summarize", "assemble_shard", "assemble", "report_pages")


def slide_ids(root):
    return [s.slide_id for s in read_manifest(root / "data/slides.tsv")]


def append_slide(root, slide_id, path, tissue="lung", report=""):
    with open(root / "data/slides.tsv", "a") as fh:
        fh.write(f"{slide_id}\t{path}\t{tissue}\t\t\t{report}\n")


def tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.mtime, m.uid, m.uname, tar.extractfile(m).read()) for m in tar.getmembers()]


def leftover_temporaries(root):
    return [p for p in (root / "data").rglob("*") if ".tmp-" in p.name]


def test_demo_builds_through_patches_to_the_dataset(built_demo):
    ids = slide_ids(built_demo)
    assert len(ids) == 3
    for slide in ids:
        grid = pl.read_parquet(built_demo / f"data/tiles/{slide}.parquet")
        assert grid.height >= 20 and (grid["size"] == 672).all() and (grid["tissue"] >= 0.5).all()
        features, coords, attrs = read_embeddings(built_demo / f"data/embeddings/{slide}.zarr")
        assert features.shape == (grid.height, 64)
        assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=2e-3)
        assert (coords == grid.select("x", "y").to_numpy()).all()
        assert attrs["input_size"] == 336 and len(attrs["checkpoint_sha256"]) == 64
        selection = pl.read_parquet(built_demo / f"data/selection/{slide}.parquet")
        kept = selection.filter("kept")
        passed = grid.height - selection["drop_reason"].str.starts_with("qc:").sum()  # quality control left out
        assert selection["by_cluster"].sum() == min(256, passed)
        members = tar_members(built_demo / f"data/patches/{slide}.tar")
        assert [m[0] for m in members] == sorted(f"x{x:07d}_y{y:07d}.jpg" for x, y in kept.select("x", "y").iter_rows())
        assert all(m[1] == 0 and m[2] == 0 and m[3] == "" for m in members)
        first = Image.open(io.BytesIO(members[0][4]))
        assert first.size == (672, 672) and first.format == "JPEG"
    prompts = pl.read_parquet(built_demo / "data/prompts/demo-colon-01.parquet")
    assert set(prompts["kind"]) == {"attribute"}  # the demo colon slide has no report
    assert leftover_temporaries(built_demo) == []

    manifest = pl.read_parquet(built_demo / "data/dataset/manifest.parquet")
    kept = sum(pl.read_parquet(built_demo / f"data/selection/{s}.parquet")["kept"].sum() for s in ids)
    sizes = json.loads((built_demo / "data/dataset/sizes.json").read_text())
    assert manifest.height == kept == sum(sizes.values()) > 0
    assert sorted(sizes) == ["00000.tar", "00001.tar"]  # 3 slides, 2 per shard
    assert manifest["key"].is_unique().all()
    assert (manifest["summary"].str.len_chars() > 0).all()
    # revise answers are decoded under their schema: every one applies (or is []), some change the text
    assert "applied" in set(manifest["revise_status"]) and set(manifest["revise_status"]) <= {"applied", "unchanged"}
    assert manifest["revise_constrained"].all() and set(manifest["revise_engine"]) == {"transformers"}
    applied = manifest.filter(pl.col("revise_status") == "applied")
    assert (applied["revised"] != applied["description"]).all() and (applied["ops"] != "[]").all()
    assert set(manifest["describe_finish"]) <= {"stop", "length"} and (manifest["describe_tokens"] > 0).all()
    metrics = json.loads((built_demo / "data/dataset/metrics.json").read_text())
    assert metrics["pct_revise_invalid"] == 0.0 and metrics["pct_revised"] > 0
    truncated = 100 * (manifest["describe_finish"] == "length").sum() / manifest.height
    assert metrics["pct_description_truncated"] == pytest.approx(truncated)
    throughput = json.loads((built_demo / "logs/throughput.json").read_text())
    assert {throughput[s]["items"] for s in ("caption", "revise", "summarize")} == {manifest.height}
    assert metrics["pairs"] == manifest.height and metrics["slides"] == 3
    # quality control: the demo's planted ink and blur are counted against the tissue patches
    tissue = sum(pl.read_parquet(built_demo / f"data/tiles/{s}.parquet").height for s in ids)
    assert metrics["tissue_patches"] == tissue and metrics["pct_qc_pen"] > 0 and metrics["pct_qc_blur"] > 0
    # the caption's CLIP score, in the manifest, each pair's json, the metrics and the plot
    assert manifest.schema["clip_score"] == pl.Float32 and manifest["clip_score"].null_count() == 0
    assert manifest["clip_score"].is_between(-1, 1).all()
    assert metrics["clip_score_p05"] <= metrics["clip_score_p50"] <= metrics["clip_score_p95"]
    assert (metrics["min_clip_score"], metrics["pairs_below_min_clip_score"]) == (None, 0)
    histogram = pl.read_csv(built_demo / "data/dataset/plots/clip_scores.csv")
    assert histogram.height == 100 and histogram["pairs"].sum() == manifest.height
    samples = list(wds.WebDataset(str(built_demo / "data/dataset/00000.tar"), shardshuffle=False))
    assert len(samples) == sizes["00000.tar"]
    first = samples[0]
    row = manifest.filter(pl.col("key") == first["__key__"]).row(0, named=True)
    assert first["txt"].decode() == row["summary"]
    assert Image.open(io.BytesIO(first["jpg"])).size == (672, 672)
    assert json.loads(first["json"])["description"] == row["description"]
    assert np.float32(json.loads(first["json"])["clip_score"]) == np.float32(row["clip_score"])


def test_demo_quality_control_leaves_out_the_planted_ink_and_blur(built_demo):
    """The demo slides carry marker strokes (lung: green; colon: blue) and an out-of-focus block (colon):
    select leaves those patches out, names the reason, and crosses them out on the overlay."""
    from pathgen.steps.select import QC_COLOURS

    found = {}
    for slide in ("demo-lung-01", "demo-colon-01", "demo-breast-01"):
        sel = pl.read_parquet(built_demo / "data" / "selection" / f"{slide}.parquet")
        qc = sel.filter(pl.col("drop_reason").str.starts_with("qc:"))
        found[slide] = dict(qc.group_by("drop_reason").len().iter_rows())
        assert not qc["kept"].any() and not (qc["by_report"] | qc["by_attribute"] | qc["by_cluster"]).any()
        with tarfile.open(built_demo / "data" / "patches" / f"{slide}.tar") as tar:
            names = set(tar.getnames())
        assert not any(f"x{x:07d}_y{y:07d}.jpg" in names for x, y in qc.select("x", "y").iter_rows())
        info = json.loads((built_demo / "data" / "tiles" / f"{slide}.json").read_text())
        overlay = np.asarray(Image.open(built_demo / "data" / "selection" / f"{slide}.png").convert("RGB"))
        sx, sy = info["thumbnail_scale"]
        for x, y, size, reason in qc.select("x", "y", "size", "drop_reason").iter_rows():
            x0, y0, x1 = int(x / sx), int(y / sy), int((x + size) / sx)
            diagonal = np.array([overlay[y0 + d, x0 + d] for d in range(max(1, x1 - x0 - 1))])
            assert (diagonal == QC_COLOURS[reason[3:]]).all(axis=1).mean() > 0.5, (slide, x, y, reason)
    assert found["demo-lung-01"].get("qc:pen", 0) >= 5, found
    assert found["demo-colon-01"].get("qc:pen", 0) >= 5 and found["demo-colon-01"].get("qc:blur", 0) >= 3, found
    assert found["demo-breast-01"] == {}, found


def test_second_run_plans_nothing(built_demo):
    assert planned_jobs(built_demo) == {}


def test_rebuild_is_byte_identical(built_demo, demo_inputs, project_copy):
    root = project_copy(demo_inputs)
    snakemake(root)
    for slide in slide_ids(root):
        for rel in (f"data/tiles/{slide}.parquet", f"data/tiles/{slide}.png", f"data/tiles/{slide}.json",
                    f"data/prompts/{slide}.parquet", f"data/selection/{slide}.parquet",
                    f"data/selection/{slide}.png", f"data/patches/{slide}.tar"):
            assert (root / rel).read_bytes() == (built_demo / rel).read_bytes(), rel
        store = f"data/embeddings/{slide}.zarr"
        files = sorted(p.relative_to(built_demo / store) for p in (built_demo / store).rglob("*") if p.is_file())
        assert files
        for rel in files:
            assert (root / store / rel).read_bytes() == (built_demo / store / rel).read_bytes(), rel
    shard_files = sorted(p.relative_to(built_demo) for d in ("captions", "revised", "summaries", "dataset")
                         for p in (built_demo / "data" / d).rglob("*") if p.is_file())
    assert len(shard_files) >= 2 * 5 + 6
    for rel in shard_files:
        assert (root / rel).read_bytes() == (built_demo / rel).read_bytes(), rel


def test_adding_a_slide_runs_only_its_jobs(built_demo, project_copy):
    root = project_copy(built_demo)
    shutil.copy(root / "data/demo/demo-lung-01.svs", root / "data/demo/extra-01.svs")
    append_slide(root, "extra-01", "data/demo/extra-01.svs")
    # Slide-bound jobs for the new slide only; it joins the last shard, so that shard's model jobs rerun.
    assert planned_jobs(root) == {**{step: 1 for step in STEPS}, **{step: 1 for step in SHARD_STEPS}, "all": 1}
    snakemake(root)
    assert (root / "data/patches/extra-01.tar").is_file()
    assert planned_jobs(root) == {}


def test_changing_a_select_param_reruns_only_select_and_what_follows(built_demo, project_copy):
    root = project_copy(built_demo)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["select"]["similarity_threshold"] = 0.8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(root) == {"select": 3, "caption": 2, "revise": 2, "summarize": 2,
                                  "assemble_shard": 2, "assemble": 1, "report_pages": 1, "all": 1}
    # a quality-control threshold is a select param too: embed (which measured the patches) does not rerun
    params["select"]["similarity_threshold"] = 0.88
    params["select"]["qc"]["max_pen_fraction"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(root) == {"select": 3, "caption": 2, "revise": 2, "summarize": 2,
                                  "assemble_shard": 2, "assemble": 1, "report_pages": 1, "all": 1}


def test_min_clip_score_reassembles_only_and_counts_the_pairs_it_leaves_out(built_demo, project_copy):
    root = project_copy(built_demo)
    before = json.loads((root / "data/dataset/metrics.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["assemble"]["min_clip_score"] = before["clip_score_p50"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(root) == {"assemble_shard": 2, "assemble": 1, "report_pages": 1, "all": 1}
    snakemake(root)
    after = json.loads((root / "data/dataset/metrics.json").read_text())
    assert after["min_clip_score"] == before["clip_score_p50"]
    assert after["pairs"] + after["pairs_below_min_clip_score"] == before["pairs"]
    assert 0 < after["pairs_below_min_clip_score"] < before["pairs"]
    manifest = pl.read_parquet(root / "data/dataset/manifest.parquet")
    assert (manifest["clip_score"] >= before["clip_score_p50"] - 1e-6).all()  # float32 of a 6-decimal score
    assert sum(json.loads((root / "data/dataset/sizes.json").read_text()).values()) == after["pairs"]
    # re-assembling found every caption's text features in the cache: no CLIP was loaded
    for stats in (root / "logs/assemble").glob("*.stats.json"):
        assert json.loads(stats.read_text())["clip_loaded"] is False, stats


def test_malformed_params_fail_before_any_job(demo_inputs, project_copy):
    root = project_copy(demo_inputs)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["select"]["report_top_k"] = "sixty-four"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = snakemake(root, check=False)
    assert proc.returncode != 0
    assert "select.report_top_k" in proc.stdout + proc.stderr
    assert not (root / "data/tiles").exists()


def corrupt_tiles(path, level=0):
    """A slide file that still opens (header, IFDs and the low levels intact) but whose `level` tiles do not
    decode: every JPEG tile keeps its start marker and loses its data, as a truncated transfer leaves it."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset + 4: offset + count] = bytes(max(0, count - 4))
    path.write_bytes(bytes(data))


def manifest_rows(root):
    return pl.read_parquet(root / "data/dataset/manifest.parquet")


def failures(root):
    lines = (root / "data/dataset/failures.tsv").read_text().splitlines()
    assert lines[0] == "shard\tslide_id\tstep\treason"
    return [line.split("\t") for line in lines[1:]]


def pair_view(frame):
    return frame.select("key", "summary", "image_sha256").sort("key")


def test_bad_slides_are_quarantined_and_the_dataset_assembles(built_demo, project_copy):
    """Shard 00000 holds a good slide (lung) and one whose tiles do not decode (breast); shard 00001 gains a
    manifest row whose file is missing, and the colon slide's report path has an apostrophe."""
    root = project_copy(built_demo)
    breast = root / "data/demo/demo-breast-01.svs"
    corrupt_tiles(breast)
    report = root / "data/demo/reports/colon's report.txt"
    report.write_text("Colon, resection: moderately differentiated adenocarcinoma. Margins are free of tumour.\n")
    rows = (root / "data/slides.tsv").read_text().splitlines()
    rows = [r + "data/demo/reports/colon's report.txt" if r.startswith("demo-colon-01\t") else r for r in rows]
    (root / "data/slides.tsv").write_text("\n".join(rows) + "\n")
    append_slide(root, "demo-missing-01", "data/demo/missing.svs")

    proc = snakemake(root)  # exits 0: input errors of slides do not fail the run
    output = proc.stdout + proc.stderr
    assert "pathgen: 2 of 4 slide(s) quarantined (listed in data/dataset/failures.tsv):" in output
    # the tile reader meets the broken JPEG tiles first: it names the slide, the tile and the TIFF page
    assert re.search(r"demo-breast-01 \[embed\]: slide 'demo-breast-01' \(data/demo/demo-breast-01\.svs\): "
                     r"cannot (decode tile \d+ of TIFF page \d+|read region)", output), output
    assert "demo-missing-01 [tile]: slide 'demo-missing-01' (data/demo/missing.svs): file not found" in output
    assert [row[:3] for row in failures(root)] == [["00000", "demo-breast-01", "embed"],
                                                   ["00001", "demo-missing-01", "tile"]]
    manifest, before = manifest_rows(root), manifest_rows(built_demo)
    assert set(manifest["slide_id"]) == {"demo-lung-01", "demo-colon-01"}
    # The good shard partner keeps exactly its pairs of the clean build.
    assert pair_view(manifest.filter(pl.col("slide_id") == "demo-lung-01")).equals(
        pair_view(before.filter(pl.col("slide_id") == "demo-lung-01")))
    sizes = json.loads((root / "data/dataset/sizes.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar"] and sum(sizes.values()) == manifest.height
    metrics = json.loads((root / "data/dataset/metrics.json").read_text())
    assert (metrics["slides_quarantined"], metrics["slides_in_shards"], metrics["complete"]) == (2, 4, True)
    status = json.loads((root / "data/patches/demo-breast-01.status.json").read_text())
    assert (status["status"], status["step"]) == ("quarantined", "embed")
    assert tar_members(root / "data/patches/demo-breast-01.tar") == []
    assert "demo-missing-01" in (root / "data/report/plots.html").read_text()
    colon_prompts = pl.read_parquet(root / "data/prompts/demo-colon-01.parquet")
    assert colon_prompts.filter(pl.col("kind") == "report")["text"].to_list() == [
        "Colon, resection: moderately differentiated adenocarcinoma. Margins are free of tumour."]
    assert planned_jobs(root) == {}

    # Replacing the broken file reruns exactly that slide and its shard.
    shutil.copy(built_demo / "data/demo/demo-breast-01.svs", breast)
    assert planned_jobs(root) == {"embed": 1, "select": 1, "caption": 1, "revise": 1, "summarize": 1,
                                  "assemble_shard": 1, "assemble": 1, "report_pages": 1, "all": 1}
    snakemake(root)
    assert [row[1] for row in failures(root)] == ["demo-missing-01"]
    breast_pairs = manifest_rows(root).filter(pl.col("slide_id") == "demo-breast-01")
    assert breast_pairs.height > 0 and pair_view(breast_pairs).equals(
        pair_view(before.filter(pl.col("slide_id") == "demo-breast-01")))
    # A missing file that appears counts as an updated input: its slide runs.
    shutil.copy(built_demo / "data/demo/demo-lung-01.svs", root / "data/demo/missing.svs")
    assert planned_jobs(root)["embed"] == 1
    assert leftover_temporaries(root) == []


def test_on_slide_error_fail_restores_the_strict_behaviour(built_demo, project_copy):
    root = project_copy(built_demo)
    good = (root / "data/demo/demo-lung-01.svs").read_bytes()
    (root / "data/demo/truncated.svs").write_bytes(good[: len(good) // 3])
    (root / "data/demo/notes.svs").write_text("this is a text file, not a slide\n")
    append_slide(root, "truncated", "data/demo/truncated.svs")
    append_slide(root, "notaslide", "data/demo/notes.svs")
    targets = [f"data/patches/{s}.tar" for s in slide_ids(root)]
    proc = snakemake(root, *targets, "--config", "on_slide_error=fail", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "pathgen tile: error: slide 'truncated' (data/demo/truncated.svs)" in output
    assert "pathgen tile: error: slide 'notaslide' (data/demo/notes.svs): not a slide format OpenSlide can read" in output
    for bad in ("truncated", "notaslide"):  # nothing of the slide-reading steps survives
        for step in ("tiles", "embeddings", "selection", "patches"):
            assert not list((root / "data" / step).glob(f"{bad}.*")), (step, bad)
    assert leftover_temporaries(root) == []


def test_a_failed_shard_job_leaves_the_dataset_of_the_completed_shards(built_demo, project_copy):
    """Not an input error of a slide (a patch tar the caption job cannot read): the job fails, the run
    fails, and data/dataset holds the other shard's pairs, never the previous build's."""
    root = project_copy(built_demo)
    tar = root / "data/patches/demo-colon-01.tar"
    tar.write_bytes(tar.read_bytes()[:5000] + b"not a tar" * 100)
    proc = snakemake(root, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "pathgen: data/dataset assembled from 1 of 2 shard(s)" in output
    assert "pathgen: shard 00001 left out of the dataset: its caption job did not complete (log: logs/caption/00001.log)" in output
    metrics = json.loads((root / "data/dataset/metrics.json").read_text())
    assert (metrics["complete"], metrics["incomplete_shards"]) == (False, ["00001"])
    assert json.loads((root / "data/dataset/sizes.json").read_text()) == {
        "00000.tar": json.loads((built_demo / "data/dataset/sizes.json").read_text())["00000.tar"]}
    assert failures(root) == [["00001", "", "shard", "its caption job did not complete (log: logs/caption/00001.log)"]]
    before = manifest_rows(built_demo)
    assert pair_view(manifest_rows(root)).equals(pair_view(before.filter(pl.col("shard") == "00000")))
    shutil.copy(built_demo / "data/patches/demo-colon-01.tar", tar)
    tar.touch()
    snakemake(root)
    assert pair_view(manifest_rows(root)).equals(pair_view(before))
    assert json.loads((root / "data/dataset/metrics.json").read_text())["complete"] is True


def test_slide_without_tissue_gives_empty_outputs(built_demo, project_copy):
    root = project_copy(built_demo)
    write_synthetic_slide(root / "data/demo/blank.svs", np.zeros((8, 8), np.uint8),
                          cell_px=512, seed=1)
    append_slide(root, "blank", "data/demo/blank.svs")
    snakemake(root)  # the whole dataset: the empty slide goes through every step
    assert pl.read_parquet(root / "data/tiles/blank.parquet").height == 0
    features, _, _ = read_embeddings(root / "data/embeddings/blank.zarr")
    assert features.shape == (0, 64)
    assert pl.read_parquet(root / "data/selection/blank.parquet").height == 0
    assert tar_members(root / "data/patches/blank.tar") == []
    before = pl.read_parquet(built_demo / "data/dataset/manifest.parquet")
    after = pl.read_parquet(root / "data/dataset/manifest.parquet")
    assert after.equals(before) and not (after["slide_id"] == "blank").any()


def test_validate_command_checks_params_manifest_and_every_file(demo_inputs, project_copy):
    out = run([str(BIN / "pathgen"), "validate"], demo_inputs).stdout
    assert "3 slide(s)" in out and "every slide file opens" in out
    root = project_copy(demo_inputs)
    append_slide(root, "gone", "data/demo/gone.svs")
    proc = run([str(BIN / "pathgen"), "validate"], root, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "pathgen validate: slide 'gone' (data/demo/gone.svs): file not found"


def read_stats(root, step):
    return {p.name: json.loads(p.read_text()) for p in sorted((root / f"logs/{step}").glob("*.stats.json"))}


def test_every_caption_fits_clips_context(built_demo):
    tokenizer = open_clip.get_tokenizer("ViT-L-14-336")
    manifest = pl.read_parquet(built_demo / "data/dataset/manifest.parquet")
    for summary, counted in manifest.select("summary", "summary_tokens").iter_rows():
        tokens = len(tokenizer.encode(summary)) + 2  # start and end tokens
        assert tokens == counted and tokens <= 77, (summary, tokens)
        ids = tokenizer([summary])[0]
        assert ids[tokens - 1] == tokenizer.eot_token_id  # the trainer sees the whole caption


def test_open_clip_trains_on_the_demo_shards(built_demo, tmp_path):
    sizes = json.loads((built_demo / "data/dataset/sizes.json").read_text())
    shards = str(built_demo / "data/dataset/{00000..00001}.tar")
    log = train_open_clip(tmp_path, shards, sum(sizes.values()), built_demo / "models/tiny-clip/open_clip_model.pt")
    assert "Train Epoch: 0" in log


def test_summarize_prompt_change_reruns_only_summarize_and_assemble(built_demo, project_copy):
    root = project_copy(built_demo)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["summarize"]["prompt"] = "Condense to {max_words} words: {description}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(root) == {"summarize": 2, "assemble_shard": 2, "assemble": 1, "report_pages": 1, "all": 1}
    describe_segments = sorted((root / "cache/describe").rglob("seg-*"))
    revise_segments = sorted((root / "cache/revise").rglob("seg-*"))
    snakemake(root)
    # no describe or revise job ran, so no model call; their caches gained nothing
    assert read_stats(root, "caption") == read_stats(built_demo, "caption")
    assert read_stats(root, "revise") == read_stats(built_demo, "revise")
    assert sorted((root / "cache/describe").rglob("seg-*")) == describe_segments
    assert sorted((root / "cache/revise").rglob("seg-*")) == revise_segments
    summarize = read_stats(root, "summarize")
    assert sum(s["misses"] for s in summarize.values()) > 0  # the new prompt did reach the model
    assert planned_jobs(root) == {}


def test_select_change_calls_the_describe_model_once_per_new_patch(built_demo, project_copy):
    root = project_copy(built_demo)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["select"]["similarity_threshold"] = 0.86
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    snakemake(root)
    old = set(pl.read_parquet(built_demo / "data/dataset/manifest.parquet")["key"])
    new = set(pl.read_parquet(root / "data/dataset/manifest.parquet")["key"])
    assert new != old  # a few patches changed
    stats = read_stats(root, "caption")
    assert sum(s["misses"] for s in stats.values()) == len(new - old)
    assert sum(s["hits"] for s in stats.values()) == len(new & old)


def test_killed_caption_job_resumes_to_identical_output(built_demo, project_copy):
    root = project_copy(built_demo)
    shutil.rmtree(root / "cache")
    entries = [s for s in read_manifest(root / "data/slides.tsv")][:2]  # shard 00000
    slides = json.dumps([{"slide_id": e.slide_id, "tissue": e.tissue, "project": e.project} for e in entries])
    params = json.dumps({"describe": yaml.safe_load((root / "params.yaml").read_text())["describe"]})
    flush_every = 4
    cmd = [str(BIN / "pathgen"), "caption", "--shard", "00000", "--slides-json", slides,
           "--patches", *[f"data/patches/{e.slide_id}.tar" for e in entries], "--params-json", params,
           "--cache-dir", "cache", "--flush-every", str(flush_every), "--out", "captions.parquet", "--stats", "stats.json"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(list((root / "cache").rglob("seg-*.jsonl"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "captions.parquet").exists()
    flushed = sum(len(p.read_text().splitlines()) for p in (root / "cache").rglob("seg-*.jsonl"))
    assert flushed >= 3 * flush_every
    run(cmd, root)
    stats = json.loads((root / "stats.json").read_text())
    total = stats["hits"] + stats["misses"]
    assert stats["hits"] == flushed  # everything flushed before the kill is reused ...
    assert total == pl.read_parquet(built_demo / "data/captions/00000.parquet").height
    # ... so at most the < flush_every items computed but not yet flushed were computed twice.
    assert (root / "captions.parquet").read_bytes() == (built_demo / "data/captions/00000.parquet").read_bytes()
