"""The Snakemake workflow for real: builds, incremental reruns, bad input (subprocess, tmp dirs)."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from conftest import BIN, planned_jobs, run, snakemake
from pathgen.demo import write_synthetic_slide
from pathgen.embeddings import read_embeddings
from pathgen.manifest import read_manifest

pytestmark = pytest.mark.workflow
STEPS = ("tile", "embed", "prompts", "select", "patches")


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


def test_demo_builds_through_patches(built_demo):
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
        assert selection["by_cluster"].sum() == min(256, grid.height)
        members = tar_members(built_demo / f"data/patches/{slide}.tar")
        assert [m[0] for m in members] == sorted(f"x{x:07d}_y{y:07d}.jpg" for x, y in kept.select("x", "y").iter_rows())
        assert all(m[1] == 0 and m[2] == 0 and m[3] == "" for m in members)
        first = Image.open(io.BytesIO(members[0][4]))
        assert first.size == (672, 672) and first.format == "JPEG"
    prompts = pl.read_parquet(built_demo / "data/prompts/demo-colon-01.parquet")
    assert set(prompts["kind"]) == {"attribute"}  # the demo colon slide has no report
    assert leftover_temporaries(built_demo) == []


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


def test_adding_a_slide_runs_only_its_jobs(built_demo, project_copy):
    root = project_copy(built_demo)
    shutil.copy(root / "data/demo/demo-lung-01.svs", root / "data/demo/extra-01.svs")
    append_slide(root, "extra-01", "data/demo/extra-01.svs")
    assert planned_jobs(root) == {**{step: 1 for step in STEPS}, "all": 1}
    snakemake(root)
    assert (root / "data/patches/extra-01.tar").is_file()
    assert planned_jobs(root) == {}


def test_changing_a_select_param_reruns_only_select_and_patches(built_demo, project_copy):
    root = project_copy(built_demo)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["select"]["similarity_threshold"] = 0.8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(root) == {"select": 3, "patches": 3, "all": 1}


def test_malformed_params_fail_before_any_job(demo_inputs, project_copy):
    root = project_copy(demo_inputs)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["select"]["report_top_k"] = "sixty-four"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = snakemake(root, check=False)
    assert proc.returncode != 0
    assert "select.report_top_k" in proc.stdout + proc.stderr
    assert not (root / "data/tiles").exists()


def test_bad_slides_fail_named_and_others_complete(demo_inputs, project_copy):
    root = project_copy(demo_inputs)
    good = (root / "data/demo/demo-lung-01.svs").read_bytes()
    (root / "data/demo/truncated.svs").write_bytes(good[: len(good) // 3])
    (root / "data/demo/notes.svs").write_text("this is a text file, not a slide\n")
    append_slide(root, "truncated", "data/demo/truncated.svs")
    append_slide(root, "notaslide", "data/demo/notes.svs")
    proc = snakemake(root, "--keep-going", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "pathgen tile: error: slide 'truncated' (data/demo/truncated.svs)" in output
    assert "pathgen tile: error: slide 'notaslide' (data/demo/notes.svs): not a slide format OpenSlide can read" in output
    for slide in ("demo-lung-01", "demo-breast-01", "demo-colon-01"):
        assert (root / f"data/patches/{slide}.tar").is_file()
    for bad in ("truncated", "notaslide"):  # nothing of the slide-reading steps survives
        for step in ("tiles", "embeddings", "selection", "patches"):
            assert not list((root / "data" / step).glob(f"{bad}.*")), (step, bad)
    assert leftover_temporaries(root) == []


def test_slide_without_tissue_gives_empty_outputs(demo_inputs, project_copy):
    root = project_copy(demo_inputs)
    write_synthetic_slide(root / "data/demo/blank.svs", np.zeros((8, 8), np.uint8),
                          cell_px=512, seed=1)
    append_slide(root, "blank", "data/demo/blank.svs")
    snakemake(root, "data/patches/blank.tar", "data/selection/blank.png")
    assert pl.read_parquet(root / "data/tiles/blank.parquet").height == 0
    features, _, _ = read_embeddings(root / "data/embeddings/blank.zarr")
    assert features.shape == (0, 64)
    assert pl.read_parquet(root / "data/selection/blank.parquet").height == 0
    assert tar_members(root / "data/patches/blank.tar") == []


def test_validate_command_checks_params_and_manifest(demo_inputs):
    out = run([str(BIN / "pathgen"), "validate"], demo_inputs).stdout
    assert "3 slide(s)" in out
