"""assemble (WebDataset shards, dataset files, PathGen-1.6M export) and the PathGen JSON importer."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import forbid_clip_loading, train_open_clip
from PIL import Image

from pathgen.demo.slides import rectangle_label_map, write_synthetic_slide
from pathgen.demo.tiny_models import TINY_CLIP_CONFIG
from pathgen.errors import PathgenError
from pathgen.interop.importer import import_pathgen_json
from pathgen.interop.pathgen_json import read_pathgen_json, write_pathgen_json
from pathgen.models import fingerprint as fingerprint_module
from pathgen.models.clip import TEXT_CACHE_AGENT, clip_fingerprint
from pathgen.steps.assemble import PART_SCHEMA, assemble_dataset, assemble_shard, percentile_of_counts, word_count
from pathgen.steps.select import SELECTION_SCHEMA
from pathgen.store.dataset import EXPORT_NAME
from pathgen.store.embeddings import read_embeddings, write_embeddings
from pathgen.store.io import encode_jpeg, read_tar, write_json, write_parquet, write_tar
from pathgen.store.manifest import SlideEntry
from pathgen.store.patch_tars import member_name
from pathgen.store.shards import pair_key
from pathgen.wsi.slide import Slide

PATCH = 672
EXTRA_TILE = (98 * PATCH, 98 * PATCH)  # a grid row of every fixture store that no pair uses


def assemble_params(clip: dict, min_clip_score: float | None = None) -> dict:
    """The `clip` and `assemble` sections assemble_shard takes."""
    return {"clip": clip, "assemble": {"min_clip_score": min_clip_score}}


def feature(key: str, dim: int) -> np.ndarray:
    """A fixture patch's image feature: random per key, L2-normalised (as embed stores them, before float16)."""
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def write_store(data_dir: Path, slide_id: str, coords: list[tuple[int, int]], clip: dict,
                fingerprint: str | None = None) -> None:
    """data/embeddings/{slide}.zarr with a feature for each of `coords` and EXTRA_TILE, in reversed order (a
    grid's order is not key order), attrs naming the CLIP (or `fingerprint`)."""
    coords = list(reversed([*coords, EXTRA_TILE]))
    dim = TINY_CLIP_CONFIG["embed_dim"]
    features = np.stack([feature(pair_key(slide_id, x, y), dim) for x, y in coords]) if coords else np.zeros((0, dim))
    grid = pl.DataFrame({"x": [x for x, _ in coords], "y": [y for _, y in coords]}, schema={"x": pl.Int64, "y": pl.Int64})
    write_embeddings(data_dir / "embeddings" / f"{slide_id}.zarr", features, grid,
                     {"slide_id": slide_id, "model_fingerprint": fingerprint or clip_fingerprint(clip)[0],
                      "n_patches": len(coords), "dim": dim})


@dataclass(frozen=True)
class TcgaEntry(SlideEntry):
    """A manifest entry that knows its TCGA file id (the export's optional `file_id`)."""

    file_id: str | None = None


def jpeg(seed: int, size: int = 64) -> bytes:
    """A small random-colour JPEG."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels = np.clip(colour + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return encode_jpeg(Image.fromarray(pixels), 90)


def pair(slide_id: str, x: int, y: int, *, tokens: int, description: str, status: str, cut: bool,
         summary: str | None = None, image: bytes | None = None) -> dict:
    """One fixture pair: what the upstream steps would have produced for it."""
    key = pair_key(slide_id, x, y)
    return {
        "slide_id": slide_id, "x": x, "y": y, "key": key, "tokens": tokens, "description": description,
        "status": status, "cut": cut, "summary": summary or f"Summary of {key}: eosin-rich stroma, 5 µm nuclei.",
        "image": image if image is not None else jpeg(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)),
    }


def write_inputs(data_dir: Path, shard: str, pairs: list[dict], clip: dict, mpp: float | None = 0.25,
                 qc: dict[str, list[str]] | None = None) -> None:
    """Write every input file of `assemble_shard` for `pairs` (plus one dropped candidate per slide, and per
    slide of `qc` one row per reason listed: patches quality control left out), with embeddings stores of
    `clip` (a `clip` section)."""
    slides: dict[str, list[dict]] = {}
    for p in pairs:
        slides.setdefault(p["slide_id"], []).append(p)
    for slide_id, rows in slides.items():
        write_tar({member_name(p["x"], p["y"]): p["image"] for p in rows}, data_dir / "patches" / f"{slide_id}.tar")
        dropped = {"x": 99 * PATCH, "y": 99 * PATCH, "kept": False}
        write_store(data_dir, slide_id, [(p["x"], p["y"]) for p in rows] + [(dropped["x"], dropped["y"])], clip)
        sel = [{"x": p["x"], "y": p["y"], "kept": True} for p in rows] + [dropped]
        failed = [{"x": (100 + j) * PATCH, "y": 0, "kept": False, "qc": f"qc:{r}"}
                  for j, r in enumerate((qc or {}).get(slide_id, []))]
        write_parquet(pl.DataFrame(
            [{
                "slide_id": slide_id, "tile": i, "x": s["x"], "y": s["y"], "size": PATCH, "level": 0,
                "read_size": PATCH, "out_size": PATCH, "by_report": i == 0, "by_attribute": False, "by_cluster": True,
                "reasons": "report+cluster" if i == 0 else "cluster", "report_score": 0.5 - 0.125 * i,
                "report_rank": i, "attribute_score": None, "attribute_rank": None, "cluster": i % 2,
                "cluster_size": 3, "nn_similarity": 0.5, "kept": s["kept"], "duplicate_of": None,
                "duplicate_similarity": None, "drop_probability": None, "drop_reason": s.get("qc"),
            } for i, s in enumerate(sel + failed)],
            schema=SELECTION_SCHEMA,
        ), data_dir / "selection" / f"{slide_id}.parquet")
        write_json({"slide_id": slide_id, "mpp": mpp, "patches": len(sel) + len(failed),
                    "patch": {"size": PATCH, "level": 0, "read_size": PATCH, "out_size": PATCH}},
                   data_dir / "tiles" / f"{slide_id}.json")
    # Upstream tables are not necessarily in key order.
    rows = list(reversed(pairs))
    write_parquet(pl.DataFrame({
        "key": [p["key"] for p in rows], "slide_id": [p["slide_id"] for p in rows],
        "x": [p["x"] for p in rows], "y": [p["y"] for p in rows], "tissue": ["t"] * len(rows),
        "prompt": ["Describe."] * len(rows), "description": [p["description"] for p in rows],
        "describe_engine": ["transformers"] * len(rows),
        "describe_finish": ["length" if p["cut"] else "stop" for p in rows],
        "describe_tokens": [len(p["description"].split()) for p in rows],
        "describe_fingerprint": ["d" * 8] * len(rows),
    }, schema_overrides={"x": pl.Int64, "y": pl.Int64, "describe_tokens": pl.Int32}),
        data_dir / "captions" / f"{shard}.parquet")
    write_parquet(pl.DataFrame({
        "key": [p["key"] for p in rows],
        "ops": [json.dumps([{"op": "edit", "old": "a", "new": "b"}] if p["status"] == "applied" else []) for p in rows],
        "revised": [p["description"] + " (revised)" for p in rows], "revise_status": [p["status"] for p in rows],
        "revise_engine": ["transformers"] * len(rows), "revise_constrained": [True] * len(rows),
        "revise_finish": ["stop"] * len(rows), "revise_fingerprint": ["r" * 8] * len(rows),
    }), data_dir / "revised" / f"{shard}.parquet")
    write_parquet(pl.DataFrame({
        "key": [p["key"] for p in rows], "summary": [p["summary"] for p in rows],
        "summary_tokens": [p["tokens"] for p in rows], "summary_cut": [p["cut"] for p in rows],
        "summary_attempts": [1] * len(rows), "summarize_engine": ["llama_cpp"] * len(rows),
        "summarize_finish": ["stop"] * len(rows), "summarize_fingerprint": ["s" * 8] * len(rows),
    }, schema_overrides={"summary_tokens": pl.Int32, "summary_attempts": pl.Int32}),
        data_dir / "summaries" / f"{shard}.parquet")


# Two shards, hand-checkable statistics: tokens 10, 20, 30, 77; 2 of 4 applied, 2 of 4 cut; 16 description words.
DOTTED = "A.DX1.ab12"  # TCGA slide names contain dots; "A.DX1../" sorts before "A/" (key order, not slide order)
SLIDES = {
    "00000": [TcgaEntry("A", "slides/A.svs", "breast", project="TCGA-BRCA", file_id="f-a"),
              TcgaEntry(DOTTED, "slides/x.svs", "lung", project="TCGA-LUAD", file_id="f-dot")],
    "00001": [SlideEntry("C", "slides/C.svs", "breast")],
}
PAIRS = {
    "00000": [
        pair("A", 0, 0, tokens=10, description="one two three", status="applied", cut=False),
        pair("A", 672, 0, tokens=20, description="one two three four five", status="unchanged", cut=True),
        pair(DOTTED, 0, 672, tokens=30, description="a b c d", status="applied", cut=False),
    ],
    "00001": [pair("C", 1344, 2016, tokens=77, description="w x y z", status="invalid", cut=True)],
}


@pytest.fixture
def built(tmp_path, random_tiny_clip) -> tuple[Path, Path]:
    """(data dir, out dir) with both fixture shards assembled."""
    data, out = tmp_path / "data", tmp_path / "out"
    for shard, pairs in PAIRS.items():
        write_inputs(data, shard, pairs, random_tiny_clip)
        assemble_shard(shard, SLIDES[shard], data, out, assemble_params(random_tiny_clip))
    return data, out


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_shard_members_in_key_order_and_webdataset_reads_them(built):
    data, out = built
    pairs = sorted(PAIRS["00000"], key=lambda p: p["key"])
    assert [p["key"] for p in pairs] == [f"{DOTTED}/x0000000_y0000672", "A/x0000000_y0000000", "A/x0000672_y0000000"]
    assert members(out / "00000.tar") == [f"{p['key']}.{ext}" for p in pairs for ext in ("jpg", "json", "txt")]
    with tarfile.open(out / "00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar} == {(0, 0, 0, "", 0o644)}

    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [p["key"] for p in pairs]
    entries = {e.slide_id: e for e in SLIDES["00000"]}
    for sample, p in zip(samples, pairs):
        assert sample["jpg"] == p["image"]  # copied unchanged from the per-slide tar
        assert sample["txt"].decode("utf-8") == p["summary"]
        meta = json.loads(sample["json"])
        entry = entries[p["slide_id"]]
        assert {k: meta[k] for k in ("slide_id", "tissue", "project", "file_id", "x", "y", "level", "size", "mpp")} == {
            "slide_id": p["slide_id"], "tissue": entry.tissue, "project": entry.project, "file_id": entry.file_id,
            "x": p["x"], "y": p["y"], "level": 0, "size": PATCH, "mpp": 0.25}
        assert meta["description"] == p["description"]
        assert meta["revised"] == p["description"] + " (revised)"
        assert meta["revise_status"] == p["status"]
        assert meta["ops"] == ([{"op": "edit", "old": "a", "new": "b"}] if p["status"] == "applied" else [])
        assert (meta["summary"], meta["summary_tokens"], meta["summary_cut"]) == (p["summary"], p["tokens"], p["cut"])
        assert meta["fingerprints"] == {"describe": "d" * 8, "revise": "r" * 8, "summarize": "s" * 8}
        assert meta["image_sha256"] == hashlib.sha256(p["image"]).hexdigest()
        assert meta["cluster"] in (0, 1) and meta["attribute_score"] is None
    first_a = next(json.loads(s["json"]) for s in samples if s["__key__"] == "A/x0000000_y0000000")
    assert (first_a["reasons"], first_a["report_score"]) == ("report+cluster", 0.5)

    # The trainer's own grouping (open_clip_train's tolerant tar reader) agrees.
    from open_clip_train.data import tarfile_to_samples_nothrow
    keys = [s["__key__"] for s in tarfile_to_samples_nothrow([{"url": str(out / "00000.tar")}])]
    assert keys == [p["key"] for p in pairs]


def test_part_rows_match_the_shard(built):
    data, out = built
    part = pl.read_parquet(out / "parts" / "00000.parquet")
    assert part.schema == pl.Schema(PART_SCHEMA)
    assert part["key"].to_list() == sorted(p["key"] for p in PAIRS["00000"])
    assert set(part["shard"]) == {"00000"}
    samples = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)}
    for row in part.iter_rows(named=True):
        meta = samples[row["key"]]
        assert json.loads(row["ops"]) == meta["ops"]
        assert row["image_sha256"] == meta["image_sha256"]
        for field in ("slide_id", "tissue", "x", "y", "summary", "summary_tokens", "summary_cut", "revise_status",
                      "description", "revised", "mpp", "reasons", "report_score", "cluster"):
            assert row[field] == meta[field], field


def test_assemble_shard_is_byte_identical_on_rerun(built, tmp_path, random_tiny_clip):
    data, out = built
    again = tmp_path / "again"
    returned = assemble_shard("00000", SLIDES["00000"], data, again, assemble_params(random_tiny_clip))
    assert (again / "00000.tar").read_bytes() == (out / "00000.tar").read_bytes()
    assert (again / "parts" / "00000.parquet").read_bytes() == (out / "parts" / "00000.parquet").read_bytes()
    assert returned.equals(pl.read_parquet(out / "parts" / "00000.parquet"))
    assert not [p for p in again.rglob("*") if p.name.startswith(".")]  # no temporaries left behind


def _drop_member(data: Path) -> str:
    tar_path = data / "patches" / "A.tar"
    content = read_tar(tar_path)
    del content[member_name(672, 0)]
    write_tar(content, tar_path)
    return "A/x0000672_y0000000"


def _drop_row(table: str):
    def drop(data: Path) -> str:
        path = data / table / "00000.parquet"
        key = "A/x0000672_y0000000"
        write_parquet(pl.read_parquet(path).filter(pl.col("key") != key), path)
        return key
    return drop


def _drop_embedding_row(data: Path) -> str:
    """A.zarr without the row of A/x0000672_y0000000 (same CLIP, one row short)."""
    path = data / "embeddings" / "A.zarr"
    _, coords, attrs = read_embeddings(path)
    keep = [(int(x), int(y)) for x, y in coords.tolist() if (x, y) not in ((672, 0), EXTRA_TILE)]
    write_store(data, "A", keep, {}, fingerprint=attrs["model_fingerprint"])
    return "A/x0000672_y0000000"


@pytest.mark.parametrize("break_input", [_drop_member, _drop_row("revised"), _drop_row("summaries"),
                                         _drop_row("captions"), _drop_embedding_row],
                         ids=["tar", "revised", "summaries", "captions", "embeddings"])
def test_missing_input_names_shard_slide_and_key(tmp_path, break_input, random_tiny_clip):
    data = tmp_path / "data"
    write_inputs(data, "00000", PAIRS["00000"], random_tiny_clip)
    key = break_input(data)
    with pytest.raises(PathgenError, match=re.escape(key)) as err:
        assemble_shard("00000", SLIDES["00000"], data, tmp_path / "out", assemble_params(random_tiny_clip))
    assert "shard 00000" in str(err.value) and "slide 'A'" in str(err.value) and "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written, no temporaries


@pytest.mark.parametrize("name", ["selection/A.parquet", "embeddings/A.zarr"])
def test_missing_selection_or_embeddings_file_is_named(tmp_path, random_tiny_clip, name):
    data = tmp_path / "data"
    write_inputs(data, "00000", PAIRS["00000"], random_tiny_clip)
    path = data / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(PathgenError, match=rf"shard 00000, slide 'A'.*{re.escape(name)} not found"):
        assemble_shard("00000", SLIDES["00000"], data, tmp_path / "out", assemble_params(random_tiny_clip))


# --- clip_score: the retrieval CLIP's cosine of patch and caption ----------------------------------------------------

def independent_scores(data: Path, clip: dict, pairs: list[dict]) -> dict[str, float]:
    """key -> cosine of the stored feature (read from the zarr arrays directly) and the summary encoded by
    open_clip directly, in float64."""
    import open_clip
    import torch
    import zarr

    model = open_clip.create_model(clip["model"], pretrained=clip["checkpoint"], force_quick_gelu=True).eval()
    tokenizer = open_clip.get_tokenizer(clip["model"])
    out = {}
    for p in pairs:
        root = zarr.open_group(str(data / "embeddings" / f"{p['slide_id']}.zarr"), mode="r")
        row = [tuple(c) for c in root["coords"][:].tolist()].index((p["x"], p["y"]))
        image = np.asarray(root["features"][row], np.float64)
        with torch.no_grad():
            text = model.encode_text(tokenizer([p["summary"]])).double().numpy()[0]
        out[p["key"]] = float(image @ text / (np.linalg.norm(image) * np.linalg.norm(text)))
    return out


def test_clip_score_is_the_cosine_of_stored_feature_and_caption_in_json_part_and_manifest(built, random_tiny_clip):
    data, out = built
    pairs = [p for shard in PAIRS.values() for p in shard]
    expected = independent_scores(data, random_tiny_clip, pairs)
    assert len(set(expected.values())) == len(pairs) and max(abs(v) for v in expected.values()) > 0.05
    assemble_dataset(out, list(PAIRS))
    manifest = {r["key"]: r["clip_score"] for r in pl.read_parquet(out / "manifest.parquet").iter_rows(named=True)}
    for shard in PAIRS:
        part = {r["key"]: r["clip_score"] for r in pl.read_parquet(out / "parts" / f"{shard}.parquet").iter_rows(named=True)}
        for sample in wds.WebDataset(str(out / f"{shard}.tar"), shardshuffle=False):
            key, score = sample["__key__"], json.loads(sample["json"])["clip_score"]
            assert score == pytest.approx(expected[key], abs=1e-6)
            assert score == round(score, 6)  # rounded to 6 decimals in the json ...
            assert np.float32(part[key]) == np.float32(score) == np.float32(manifest[key])  # ... Float32 in the tables
    assert pl.read_parquet(out / "manifest.parquet").schema["clip_score"] == pl.Float32


def test_metrics_and_plot_of_the_clip_scores(built):
    data, out = built
    metrics = assemble_dataset(out, list(PAIRS))
    scores = np.array(pl.read_parquet(out / "manifest.parquet")["clip_score"].to_list(), np.float64).round(6)
    assert metrics["clip_score_mean"] == pytest.approx(scores.mean(), abs=1e-6)
    for q in (5, 50, 95):
        assert metrics[f"clip_score_p{q:02d}"] == pytest.approx(np.percentile(scores, q), abs=1e-6), q
    assert (metrics["min_clip_score"], metrics["pairs_below_min_clip_score"]) == (None, 0)
    with open(out / "plots" / "clip_scores.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [r["clip_score"] for r in hist] == [f"{-1 + 0.02 * i:.2f}" for i in range(100)]
    assert {r["clip_score"]: int(r["pairs"]) for r in hist if int(r["pairs"])} == {
        f"{np.floor(s / 0.02) * 0.02:.2f}": int(sum(np.floor(t / 0.02) == np.floor(s / 0.02) for t in scores))
        for s in scores}


def test_min_clip_score_leaves_out_exactly_the_pairs_below_it(built, tmp_path, random_tiny_clip):
    data, out = built
    scores = {r["key"]: r["clip_score"] for s in PAIRS for r in
              pl.read_parquet(out / "parts" / f"{s}.parquet").iter_rows(named=True)}
    rounded = {k: round(v, 6) for k, v in scores.items()}
    threshold = sorted(rounded.values())[1]  # one pair below, one exactly at it (kept)
    below = {k for k, v in rounded.items() if v < threshold}
    assert len(below) == 1
    filtered = tmp_path / "filtered"
    for shard in PAIRS:
        info = {}
        part = assemble_shard(shard, SLIDES[shard], data, filtered, assemble_params(random_tiny_clip, threshold), info=info)
        kept = sorted(p["key"] for p in PAIRS[shard] if p["key"] not in below)
        assert part["key"].to_list() == kept
        assert sorted({m.rsplit(".", 1)[0] for m in members(filtered / f"{shard}.tar")}) == kept
        records = json.loads((filtered / "parts" / f"{shard}.slides.json").read_text())
        for rec in records:
            left_out = sum(1 for k in below if k.split("/")[0] == rec["slide_id"])
            assert (rec["pairs_below_min_clip_score"], rec["min_clip_score"]) == (left_out, threshold)
            assert rec["pairs"] == sum(1 for k in kept if k.split("/")[0] == rec["slide_id"])
        assert info["pairs_below_min_clip_score"] == sum(1 for k in below if k in {p["key"] for p in PAIRS[shard]})
    metrics = assemble_dataset(filtered, list(PAIRS))
    assert (metrics["pairs"], metrics["min_clip_score"], metrics["pairs_below_min_clip_score"]) == (3, threshold, 1)
    assert metrics["clip_score_mean"] == pytest.approx(np.mean([v for k, v in rounded.items() if k not in below]),
                                                       abs=1e-6)
    # kept pairs are byte for byte the unfiltered shard's
    unfiltered = {s["__key__"]: s for shard in PAIRS for s in wds.WebDataset(str(out / f"{shard}.tar"), shardshuffle=False)}
    for shard in PAIRS:
        for s in wds.WebDataset(str(filtered / f"{shard}.tar"), shardshuffle=False):
            assert all(s[ext] == unfiltered[s["__key__"]][ext] for ext in ("jpg", "json", "txt"))


def test_a_store_embedded_by_another_clip_is_an_error_naming_it(tmp_path, random_tiny_clip):
    data = tmp_path / "data"
    write_inputs(data, "00000", PAIRS["00000"], random_tiny_clip)
    write_store(data, DOTTED, [(0, 672)], random_tiny_clip, fingerprint="0" * 64)
    with pytest.raises(PathgenError, match=rf"shard 00000, slide '{re.escape(DOTTED)}': .*{re.escape(DOTTED)}\.zarr "
                                           r"was embedded with a different CLIP \(fingerprint 000000000000\)") as err:
        assemble_shard("00000", SLIDES["00000"], data, tmp_path / "out", assemble_params(random_tiny_clip))
    assert "\n" not in str(err.value) and random_tiny_clip["checkpoint"] in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_second_assemble_of_the_shard_is_served_from_the_text_cache(built, tmp_path, random_tiny_clip, monkeypatch):
    data, out = built
    cache = tmp_path / "cache"
    texts = len({p["summary"] for p in PAIRS["00000"]})

    def run(name):
        info = {}
        assemble_shard("00000", SLIDES["00000"], data, tmp_path / name, assemble_params(random_tiny_clip),
                       cache_dir=cache, info=info)
        return info, {f: (tmp_path / name / f).read_bytes() for f in ("00000.tar", "parts/00000.parquet")}

    monkeypatch.setattr(fingerprint_module, "_known", {})  # a fresh job: this process hashed the checkpoint already
    first_info, first = run("first")
    assert first_info["clip_loaded"] is True and (first_info["cache"]["misses"], first_info["texts"]) == (texts, texts)
    assert (cache / TEXT_CACHE_AGENT).is_dir() and (cache / ".checkpoint-hashes").is_dir()

    forbid_clip_loading(monkeypatch)
    second_info, second = run("second")
    assert second_info["clip_loaded"] is False
    assert (second_info["cache"]["hits"], second_info["cache"]["misses"], second_info["cache"]["puts"]) == (texts, 0, 0)
    uncached = {f: (out / f).read_bytes() for f in ("00000.tar", "parts/00000.parquet")}
    assert second == first == uncached  # cached text features are the computed ones, byte for byte


def test_the_assemble_shard_command_takes_the_rule_arguments_and_writes_stats(built, tmp_path, random_tiny_clip,
                                                                            capsys):
    from pathgen.cli import main

    data, out = built
    cache = tmp_path / "cache"
    stats = tmp_path / "stats.json"
    slides = json.dumps([vars(e) for e in SLIDES["00000"]])
    argv = ["assemble-shard", "--shard", "00000", "--slides-json", slides, "--data-dir", str(data),
            "--out-dir", str(tmp_path / "cli"), "--params-json", json.dumps(assemble_params(random_tiny_clip, 2 / 3 - 1)),
            "--cache-dir", str(cache), "--flush-every", "2", "--stats", str(stats)]
    assert main(argv) == 0
    first = json.loads(stats.read_text())
    assert (first["step"], first["shard"], first["clip_loaded"], first["cache"]["misses"]) == ("assemble", "00000", True, 3)
    assert first["pairs"] + first["pairs_below_min_clip_score"] == 3
    assert main(argv) == 0
    again = json.loads(stats.read_text())
    assert (again["clip_loaded"], again["cache"]["hits"], again["pairs"]) == (False, 3, first["pairs"])
    capsys.readouterr()
    assert main([*argv, "--params-json", json.dumps(assemble_params(random_tiny_clip, 1.5))]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "pathgen assemble-shard: error: --params-json: key 'assemble.min_clip_score': 1.5 is greater than the maximum of 1"]


def test_dataset_files(built):
    data, out = built
    metrics = assemble_dataset(out, ["00000", "00001"])

    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}
    from open_clip_train.data import get_dataset_size  # how the trainer sizes a shard list without --train-num-samples
    assert get_dataset_size(f"{out}/{{00000..00001}}.tar") == (4, 2)
    expected = {
        "pairs": 4, "slides": 3, "shards": 2,
        "summary_tokens_mean": 34.25,  # (10 + 20 + 30 + 77) / 4
        "summary_tokens_p95": 69.95,  # sorted 10, 20, 30, 77: position 0.95 * 3 = 2.85 -> 30 + 0.85 * 47
        "description_words_mean": 4.0,  # (3 + 5 + 4 + 4) / 4
        "pct_revised": 50.0, "pct_cut": 50.0,
        "pct_description_truncated": 50.0,  # the fixture's cut pairs had their descriptions cut too
        "pct_revise_invalid": 25.0, "pct_revise_unconstrained": 0.0, "pct_summary_truncated": 0.0,  # 1 of 4 invalid
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert json.loads((out / "metrics.json").read_text()) == metrics

    manifest = pl.read_parquet(out / "manifest.parquet")
    parts = [pl.read_parquet(out / "parts" / f"{s}.parquet") for s in ("00000", "00001")]
    assert manifest.equals(pl.concat(parts))
    assert manifest["shard"].to_list() == ["00000"] * 3 + ["00001"]
    assert manifest["key"].to_list()[:3] == sorted(manifest["key"].to_list()[:3])

    with open(out / "plots" / "caption_tokens.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [int(r["tokens"]) for r in hist] == list(range(78))
    assert sum(int(r["count"]) for r in hist) == 4
    assert {int(r["tokens"]): int(r["count"]) for r in hist if int(r["count"])} == {10: 1, 20: 1, 30: 1, 77: 1}
    assert (out / "plots" / "pairs_per_tissue.csv").read_text() == "tissue,pairs\nbreast,3\nlung,1\n"

    export = json.loads((out / EXPORT_NAME).read_text())
    assert export == [
        {"wsi_id": p["slide_id"], "position": [str(p["x"]), str(p["y"])], "caption": p["summary"],
         "file_id": {"A": "f-a", DOTTED: "f-dot", "C": None}[p["slide_id"]]}
        for shard in ("00000", "00001") for p in sorted(PAIRS[shard], key=lambda p: p["key"])
    ]
    assert all(list(rec) == ["wsi_id", "position", "caption", "file_id"] for rec in export)

    snapshot = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert assemble_dataset(out, ["00000", "00001"]) == metrics
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == snapshot


def test_metrics_give_the_share_of_tissue_patches_quality_control_left_out(tmp_path, random_tiny_clip):
    data, out = tmp_path / "data", tmp_path / "out"
    qc = {"A": ["pen", "pen", "blur"], DOTTED: ["background"]}
    for shard, pairs in PAIRS.items():
        write_inputs(data, shard, pairs, random_tiny_clip, qc=qc)
        assemble_shard(shard, SLIDES[shard], data, out, assemble_params(random_tiny_clip))
    records = {r["slide_id"]: r for r in json.loads((out / "parts" / "00000.slides.json").read_text())}
    assert records["A"]["qc_excluded"] == {"blur": 1, "pen": 2} and records[DOTTED]["qc_excluded"] == {"background": 1}
    assert records["A"]["tissue_patches"] == 2 + 1 + 3  # kept, dropped candidate, left out
    metrics = assemble_dataset(out, list(PAIRS))
    tissue = (2 + 1 + 3) + (1 + 1 + 1) + (1 + 1)
    assert metrics["tissue_patches"] == tissue and metrics["patches_qc_excluded"] == 4
    assert metrics["pct_qc_pen"] == round(100 * 2 / tissue, 6) and metrics["pct_qc_fold"] == 0.0
    assert metrics["pct_qc_excluded"] == round(100 * 4 / tissue, 6)
    # a slides record from before quality control is refused, not counted as none left out
    path = out / "parts" / "00001.slides.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "qc_excluded"} for r in json.loads(path.read_text())]))
    with pytest.raises(PathgenError, match="shard 00001: .*00001.slides.json has no .*quality control counts"):
        assemble_dataset(out, list(PAIRS))


def test_dataset_needs_every_shard(built):
    data, out = built
    with pytest.raises(PathgenError, match="shard 00002"):
        assemble_dataset(out, ["00000", "00002"])


# --- PathGen-1.6M JSON: export -> import round trip on a real slide -------------------------------------------------

@pytest.fixture(scope="module")
def real_slide(tmp_path_factory) -> Path:
    """A small real Aperio slide (4096 x 3072 px at level 0)."""
    path = tmp_path_factory.mktemp("wsi") / "slide.svs"
    write_synthetic_slide(path, rectangle_label_map(6, 8, (1, 1, 5, 7), 2), cell_px=512, seed=1)
    return path


def test_export_import_round_trip(tmp_path, real_slide, random_tiny_clip):
    positions = {"S1": [(672, 672), (2016, 1344), (1344, 672)], "S2": [(0, 0), (3360, 2016)], "GONE": [(672, 0)]}
    pairs = []
    with Slide(real_slide, "slide") as slide:
        for slide_id, coords in positions.items():
            for i, (x, y) in enumerate(coords):
                image = encode_jpeg(slide.read_patch(x, y, 0, PATCH, PATCH), 95)
                pairs.append(pair(slide_id, x, y, tokens=5 + i, description="d", status="applied", cut=False,
                                  summary=f"{slide_id} caption {i}: glands, ±atypia.", image=image))
    data, out = tmp_path / "data", tmp_path / "out"
    write_inputs(data, "00000", pairs, random_tiny_clip)
    slides = [TcgaEntry(s, "x.svs", "colon", file_id=f"file-{s}") for s in positions]
    assemble_shard("00000", slides, data, out, assemble_params(random_tiny_clip))
    assemble_dataset(out, ["00000"])
    export = out / EXPORT_NAME

    local = {"S1": real_slide, "S2": real_slide}  # GONE is not here locally
    imported = tmp_path / "imported"
    done = tmp_path / "done"
    summary = import_pathgen_json(export, local, imported, done_dir=done)
    slides, records = summary["slides"], summary["records"]
    assert (slides["listed"], slides["imported"], slides["resumed"], slides["missing_first"]) == (3, 2, 0, ["GONE"])
    assert (records["read"], records["imported"], records["skipped"]["slide_not_in_manifest"]) == (6, 5, 1)
    assert json.loads((imported / "sizes.json").read_text()) == {"S1.tar": 3, "S2.tar": 2}
    assert sorted(p.name for p in imported.iterdir()) == ["S1.tar", "S2.tar", "import-summary.json", "sizes.json"]
    assert json.loads((done / "S1.json").read_text())["pairs"] == 3

    assembled = {s["__key__"]: s for s in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)}
    for slide_id in ("S1", "S2"):
        samples = list(wds.WebDataset(str(imported / f"{slide_id}.tar"), shardshuffle=False))
        assert [s["__key__"] for s in samples] == sorted(pair_key(slide_id, x, y) for x, y in positions[slide_id])
        for s in samples:
            meta = json.loads(s["json"])
            assert pair_key(meta["wsi_id"], meta["x"], meta["y"]) == s["__key__"]
            assert (meta["source"], meta["file_id"]) == ("pathgen-1.6m", f"file-{slide_id}")
            assert s["txt"] == assembled[s["__key__"]]["txt"]  # caption round-trips
            assert s["jpg"] == assembled[s["__key__"]]["jpg"]  # same level-0 672 px read, same JPEG settings

    # Resumable: a second run skips every finished slide; a deleted shard is redone alone.
    stamps = {p.name: p.stat().st_mtime_ns for p in imported.glob("*.tar")}
    again = import_pathgen_json(export, local, imported, done_dir=done)
    assert [again["slides"][k] for k in ("imported", "resumed", "missing_first")] == [0, 2, ["GONE"]]
    assert {p.name: p.stat().st_mtime_ns for p in imported.glob("*.tar")} == stamps
    s2 = (imported / "S2.tar").read_bytes()
    (imported / "S2.tar").unlink()
    redo = import_pathgen_json(export, local, imported, done_dir=done)
    assert (redo["slides"]["imported"], redo["slides"]["resumed"], redo["records"]["imported"]) == (1, 1, 2)
    assert (imported / "S2.tar").read_bytes() == s2
    assert (imported / "S1.tar").stat().st_mtime_ns == stamps["S1.tar"]


def test_read_pathgen_json_validates_and_groups(tmp_path):
    listing = tmp_path / "pathgen.json"
    listing.write_text(json.dumps([
        {"wsi_id": "W", "position": ["10", "20"], "caption": "c1", "file_id": "f"},
        {"wsi_id": "V", "position": [0, 5], "caption": "c2"},
        {"wsi_id": "W", "position": ["10", "20"], "caption": "again", "file_id": "f"},
    ]))
    read = read_pathgen_json(listing)
    assert (read.records, read.skipped["duplicate_position"], read.examples) == (3, 1, [])
    assert {w: [(p.x, p.y, p.caption, p.file_id) for p in ps] for w, ps in read.groups.items()} == {
        "W": [(10, 20, "c1", "f")], "V": [(0, 5, "c2", None)]}


def test_read_pathgen_json_skips_and_counts_malformed_records(tmp_path):
    listing = tmp_path / "pathgen.json"
    listing.write_text(json.dumps([
        {"wsi_id": "W", "position": ["ten", "20"], "caption": "c"},
        {"wsi_id": "W", "position": ["1"], "caption": "c"},
        {"wsi_id": "W", "position": [True, 2], "caption": "c"},
        {"wsi_id": "W", "position": ["0", "0"]},
        {"wsi_id": "W", "position": ["0", "0"], "caption": "  "},
        {"wsi_id": "bad id", "position": ["0", "0"], "caption": "c"},
        {"wsi_id": "W", "position": ["0", "0"], "caption": "c", "file_id": 7},
        ["not", "an", "object"],
        {"wsi_id": "W", "position": ["-5", "8"], "caption": "kept: bounds are the importer's"},
    ]))
    read = read_pathgen_json(listing)
    assert read.records == 9
    assert read.skipped == {"not_an_object": 1, "bad_wsi_id": 1, "missing_caption": 2, "bad_file_id": 1,
                            "bad_position": 3, "duplicate_position": 0}
    assert [(p.x, p.y) for p in read.groups["W"]] == [(-5, 8)]
    assert read.examples[0] == "record 0 (wsi_id 'W'): position must hold two integers, got ['ten', '20']"
    assert len(read.examples) == 5 and read.examples[3].startswith("record 3 (wsi_id 'W'): caption")


@pytest.mark.parametrize("text, message", [
    ('{"wsi_id": "W"}', "expected a JSON list of records, got dict"),
    ("[{", "not valid JSON"),
])
def test_read_pathgen_json_rejects_a_file_not_in_the_format(tmp_path, text, message):
    listing = tmp_path / "pathgen.json"
    listing.write_text(text)
    with pytest.raises(PathgenError, match=message):
        read_pathgen_json(listing)


# --- open_clip's trainer on an assembled shard --------------------------------------------------------------------

def test_open_clip_trains_on_an_assembled_shard(tmp_path, random_tiny_clip):
    """`python -m open_clip_train.main`, unchanged, trains the tiny CLIP one epoch on assemble's output (CPU, offline)."""
    from pathgen.demo.tiny_models import build_tiny_clip

    rng = np.random.default_rng(0)
    pairs = []
    words = ["glands", "stroma", "nuclei", "mitoses", "necrosis", "lymphocytes", "fibrosis", "mucin"]
    for i in range(64):
        slide_id, x, y = f"S{i // 32}", (i % 8) * PATCH, (i % 32 // 8) * PATCH
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        image = encode_jpeg(Image.new("RGB", (PATCH, PATCH), tuple(int(c) for c in colour)), 90)
        text = f"H&E patch showing {words[i % 8]} and {words[(i * 3) % 8]}."
        pairs.append(pair(slide_id, x, y, tokens=12, description=text, status="unchanged", cut=False,
                          summary=text, image=image))
    data, shards = tmp_path / "data", tmp_path / "shards"
    write_inputs(data, "00000", pairs, random_tiny_clip)
    assemble_shard("00000", [SlideEntry("S0", "a.svs", "colon"), SlideEntry("S1", "b.svs", "colon")], data, shards,
                   assemble_params(random_tiny_clip))
    assemble_dataset(shards, ["00000"])

    log = train_open_clip(tmp_path, str(shards / "00000.tar"), 64, build_tiny_clip(tmp_path / "models"))
    assert re.findall(r"Train Epoch: 0 \[\s*(\d+)/64", log) == [str(8 * i) for i in range(1, 9)], log  # 8 steps


# --- assemble_dataset streams: same bytes as a straightforward in-memory computation, bounded memory -----------

WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000"]
NOT_WHITESPACE = ["\u200b", "\u180e", "\ufeff"]  # zero-width: words, not separators, for str.split


def _text(rng: np.random.Generator, words: int) -> str:
    vocab = ["gland", "stroma", "µm", "naïve", "cells", "—", "x", "22", "🙂", *NOT_WHITESPACE]
    parts = [str(rng.choice(WHITESPACE))] if rng.random() < 0.3 else []
    for _ in range(words):
        parts += [str(rng.choice(vocab)), str(rng.choice(WHITESPACE))]
    return "".join(parts)


def _part_frame(shard: str, rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([{**{c: None for c in PART_SCHEMA}, **r, "shard": shard} for r in rows],
                        schema=PART_SCHEMA, orient="row")


def write_part(out: Path, shard: str, part: pl.DataFrame, below: dict[str, int] | None = None,
               min_clip_score: float | None = None) -> None:
    """A shard as assemble_dataset reads it: its part, its slides record (with `below`: slide -> pairs left
    out under `min_clip_score`) and (empty) tar."""
    write_parquet(part, out / "parts" / f"{shard}.parquet")
    slides = sorted(set(part["slide_id"]) | set(below or {}))
    write_json([{"slide_id": s, "shard": shard, "status": "ok", "step": None, "reason": None,
                 "pairs": int((part["slide_id"] == s).sum()), "pairs_below_min_clip_score": (below or {}).get(s, 0),
                 "min_clip_score": min_clip_score, "tissue_patches": 0, "qc_excluded": {}} for s in slides],
               out / "parts" / f"{shard}.slides.json")
    (out / f"{shard}.tar").write_bytes(b"")


IRREGULAR_MIN_CLIP_SCORE = 0.01


def irregular_parts(out: Path, seed: int = 3) -> list[str]:
    """Five shards of odd parts: one empty, one not in key order, nulls where the schema allows them,
    whitespace of every kind in the texts, token counts past 77, tied tissue counts."""
    rng = np.random.default_rng(seed)
    sizes = {"00000": 40, "00001": 0, "00002": 25, "00003": 60, "00004": 1}
    for s, (shard, size) in enumerate(sizes.items()):
        rows = []
        for i in range(size):
            slide_id = f"TCGA-{s}{i % 3}.DX1"
            x, y = int(rng.integers(0, 50)) * 672, int(rng.integers(0, 50)) * 672
            rows.append({
                "key": pair_key(slide_id, x, y) + f"-{i}", "slide_id": slide_id, "x": x, "y": y,
                "tissue": str(rng.choice(["breast", "lung", "colon", None])),
                "file_id": None if i % 4 == 0 else f"f-{slide_id}",
                "description": None if i % 11 == 5 else _text(rng, int(rng.integers(0, 30))),
                "summary": _text(rng, int(rng.integers(1, 12))) + "é",
                "summary_tokens": int(rng.integers(0, 120)), "describe_tokens": int(rng.integers(0, 400)),
                "describe_finish": rng.choice(["stop", "length", None]),
                "revise_status": rng.choice(["applied", "unchanged", "invalid", None]),
                "revise_constrained": rng.choice([True, False, None]),
                "summarize_finish": rng.choice(["stop", "length"]), "summary_cut": rng.choice([True, False, None]),
                # 6 decimals as assemble_shard rounds them; ties and both ends of the range
                "clip_score": [-1.0, 1.0, 0.123457][i] if s == 3 and i < 3 else
                round(float(rng.choice([0.25, rng.uniform(-0.5, 0.9)])), 6),
            })
        rows = [{**r, "tissue": None if r["tissue"] == "None" else r["tissue"]} for r in rows]
        part = _part_frame(shard, rows)
        below = {f"TCGA-{s}0.DX1": s, "TCGA-9.DX1": 1} if s else None  # counts of pairs left out (and a slide without pairs)
        write_part(out, shard, part if shard == "00003" else part.sort("key"), below, IRREGULAR_MIN_CLIP_SCORE)  # 00003: reversed-ish order
    return list(sizes)


def expected_dataset_files(out: Path, shards: list[str]) -> dict[str, bytes]:
    """What assemble_dataset must write, computed the straightforward way: every part in memory."""
    manifest = pl.concat([pl.read_parquet(out / "parts" / f"{s}.parquet").sort("key") for s in shards])
    rows = manifest.to_dicts()
    n = len(rows)

    def mean(values):
        return round(float(np.mean(np.array(values, np.float64))), 6)

    def pct(test):
        return round(100.0 * sum(1 for r in rows if test(r)) / n, 6)

    tokens = [r["summary_tokens"] for r in rows]
    micro = np.array([round(r["clip_score"] * 1e6) for r in rows], np.int64)  # the Float32 scores, in millionths
    assert np.allclose(micro / 1e6, [r["clip_score"] for r in rows], rtol=0, atol=1e-7)
    slides = [rec for s in shards for rec in json.loads((out / "parts" / f"{s}.slides.json").read_text())]
    metrics = {
        "pairs": n, "slides": len({r["slide_id"] for r in rows}), "shards": len(shards),
        "summary_tokens_mean": mean(tokens),
        "summary_tokens_p95": round(float(np.percentile(np.array(tokens, np.float64), 95)), 6),
        "summary_words_mean": mean([len(r["summary"].split()) for r in rows]),
        "description_words_mean": mean([len((r["description"] or "").split()) for r in rows]),
        "description_tokens_mean": mean([r["describe_tokens"] for r in rows]),
        "pct_description_truncated": pct(lambda r: r["describe_finish"] == "length"),
        "pct_revised": pct(lambda r: r["revise_status"] == "applied"),
        "pct_revise_unchanged": pct(lambda r: r["revise_status"] == "unchanged"),
        "pct_revise_invalid": pct(lambda r: r["revise_status"] == "invalid"),
        "pct_revise_unconstrained": pct(lambda r: not r["revise_constrained"]),
        "pct_summary_truncated": pct(lambda r: r["summarize_finish"] == "length"),
        "pct_cut": pct(lambda r: bool(r["summary_cut"])),
        "clip_score_mean": round(int(micro.sum()) / n / 1e6, 6),
        **{f"clip_score_p{q:02d}": round(float(np.percentile(micro, q)) / 1e6, 6) for q in (5, 50, 95)},
        "min_clip_score": IRREGULAR_MIN_CLIP_SCORE,
        "pairs_below_min_clip_score": sum(r["pairs_below_min_clip_score"] for r in slides),
        "complete": True, "incomplete_shards": [], "slides_in_shards": len(slides), "slides_quarantined": 0,
        "slides_without_pairs": sum(1 for r in slides if r["pairs"] == 0),
        # write_part's records: no tissue patches counted, none left out
        "tissue_patches": 0, "patches_qc_excluded": 0, "pct_qc_excluded": None,
        **{f"pct_qc_{reason}": None for reason in ("background", "pen", "fold", "blur")},
    }
    bins = np.clip((micro + 1_000_000) // 20_000, 0, 99)
    clip_hist = "".join(f"{(i * 20_000 - 1_000_000) / 1e6:.2f},{int((bins == i).sum())}\n" for i in range(100))
    counts = {t: tokens.count(t) for t in set(tokens)}
    hist = "".join(f"{t},{counts.get(t, 0)}\n" for t in range(max(77, *tokens) + 1))
    tissues = {t: sum(1 for r in rows if r["tissue"] == t) for t in {r["tissue"] for r in rows}}
    by_pairs = sorted(tissues.items(), key=lambda kv: (-kv[1], kv[0] is not None, kv[0] or ""))
    records = [json.dumps({"wsi_id": r["slide_id"], "position": [str(r["x"]), str(r["y"])], "caption": r["summary"],
                           "file_id": r["file_id"]}, ensure_ascii=False) for r in rows]
    manifest_path = out.parent / "expected-manifest.parquet"
    write_parquet(manifest, manifest_path)
    return {
        "manifest.parquet": manifest_path.read_bytes(),
        "metrics.json": (json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode(),
        "sizes.json": (json.dumps({f"{s}.tar": sum(1 for r in rows if r["shard"] == s) for s in shards},
                                  indent=2, sort_keys=True) + "\n").encode(),
        EXPORT_NAME: ("[\n" + ",\n".join(records) + ("\n" if records else "") + "]\n").encode(),
        "plots/caption_tokens.csv": ("tokens,count\n" + hist).encode(),
        "plots/pairs_per_tissue.csv": ("tissue,pairs\n" + "".join(f"{t or ''},{c}\n" for t, c in by_pairs)).encode(),
        "plots/clip_scores.csv": ("clip_score,pairs\n" + clip_hist).encode(),
        "failures.tsv": b"shard\tslide_id\tstep\treason\n",
    }


def test_dataset_files_are_the_straightforward_computation_byte_for_byte(tmp_path):
    out = tmp_path / "out"
    shards = irregular_parts(out)
    part = pl.read_parquet(out / "parts" / "00003.parquet")
    assert part["key"].to_list() != sorted(part["key"].to_list())  # the fixture has a part out of key order
    metrics = assemble_dataset(out, shards)
    expected = expected_dataset_files(out, shards)
    assert {name: (out / name).read_bytes() for name in expected} == expected
    assert metrics["summary_tokens_p95"] > 77 and metrics["pairs"] == 126
    # shards 00001..00004 leave out 1..4 pairs of their first slide and 1 of a slide without pairs
    assert metrics["pairs_below_min_clip_score"] == (1 + 2 + 3 + 4) + 4 and metrics["slides_without_pairs"] == 5
    hist = (out / "plots" / "clip_scores.csv").read_text().splitlines()
    assert (hist[1], hist[-1]) == ("-1.00,1", "0.98,1")  # -1 and 1 in the edge bins


SPACES = [chr(c) for c in range(0x3001) if chr(c).isspace()]  # every character str.split() splits on


@given(st.lists(st.text(alphabet=st.sampled_from([*SPACES, *NOT_WHITESPACE, "a", "é", "\x00", "\x1b", "\x7f"]),
                        max_size=20) | st.none(), max_size=20))
@settings(max_examples=200, deadline=None)
def test_word_count_is_str_split(texts):
    counted = pl.DataFrame({"t": texts}, schema={"t": pl.String}).select(word_count("t"))["t"].to_list()
    assert counted == [len((t or "").split()) for t in texts]


@given(st.lists(st.integers(0, 300), max_size=60), st.sampled_from([0, 5, 50, 95, 99.5, 100]))
@settings(max_examples=300, deadline=None)
def test_percentile_of_counts_is_numpys_bit_for_bit(values, q):
    counts = [(v, values.count(v)) for v in sorted(set(values))]
    expected = float(np.percentile(np.array(values, np.float64), q)) if values else None
    assert percentile_of_counts(counts, q) == expected


def test_empty_dataset(tmp_path):
    out = tmp_path / "out"
    write_part(out, "00000", pl.DataFrame(schema=PART_SCHEMA))
    metrics = assemble_dataset(out, ["00000"])
    assert (metrics["pairs"], metrics["summary_tokens_mean"], metrics["summary_tokens_p95"]) == (0, None, None)
    assert [metrics[f"clip_score_{m}"] for m in ("mean", "p05", "p50", "p95")] == [None] * 4
    assert (metrics["min_clip_score"], metrics["pairs_below_min_clip_score"]) == (None, 0)
    assert (out / "plots" / "clip_scores.csv").read_text().count(",0\n") == 100
    assert (out / EXPORT_NAME).read_text() == "[\n]\n"
    assert pl.read_parquet(out / "manifest.parquet").equals(pl.DataFrame(schema=PART_SCHEMA))


def _long_parts(out: Path, shards: int, pairs: int, words: int, seed: int = 0) -> int:
    """Parts of `pairs` pairs each, in key order, with distinct texts of about `words` words (description,
    revised) and a fifth of that (summary): their text bytes (what holding them in memory takes at least)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghij"), int(k))) for k in rng.integers(2, 10, 500)])
    pool = pl.Series([" ".join(rng.choice(vocab, int(k))) for k in rng.integers(words // 2, words * 3 // 2, 97)])
    total = 0
    for s in range(shards):
        i = np.arange(pairs)
        base = pl.DataFrame({"x": i % 40 * 672, "y": i // 40 * 672, "slide": i // 500}).with_columns(
            slide_id=pl.format("S{}-{}", pl.lit(s), pl.col("slide")))
        base = base.with_columns(key=pl.format("{}/x{}_y{}", "slide_id", pl.col("x").cast(pl.String).str.zfill(7),
                                               pl.col("y").cast(pl.String).str.zfill(7)))
        text = pool[((i + s * pairs) * 7 % 97).tolist()]
        part = base.with_columns(
            shard=pl.lit(f"{s:05d}"), tissue=pl.lit("colon"), description=pl.format("{} {}", "key", pl.lit(text)),
            revised=pl.format("{} {} revised", "key", pl.lit(text)),
            summary=pl.format("{} {}", "key", pl.lit(text).str.slice(0, words)), summary_tokens=pl.lit(40),
            ops=pl.lit("[]"), revise_status=pl.lit("applied"), describe_finish=pl.lit("stop"),
        ).with_columns(*[pl.lit(None, d).alias(c) for c, d in PART_SCHEMA.items() if c not in base.columns
                         and c not in ("shard", "tissue", "description", "revised", "summary", "summary_tokens",
                                       "ops", "revise_status", "describe_finish")]
                       ).select(list(PART_SCHEMA)).cast(PART_SCHEMA).sort("key")
        total += sum(int(part[c].str.len_bytes().sum()) for c in ("description", "revised", "summary", "key"))
        write_part(out, f"{s:05d}", part)
    return total


# Peak RSS from VmHWM, this process's own: ru_maxrss of a child started from a large parent (pytest, after
# the tests before) reports the parent's peak, carried over by vfork + exec.
MEASURE = """
import json, re, sys
from pathlib import Path
from pathgen.steps.assemble import assemble_dataset
metrics = assemble_dataset(sys.argv[1], json.loads(sys.argv[2]))
peak_kb = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"pairs": metrics["pairs"], "peak_mb": peak_kb / 1024}))
"""


def test_assemble_dataset_memory_does_not_grow_with_the_texts(tmp_path):
    """400,000 pairs with 1.7 GB of text: the in-memory implementation (every part concatenated, the export
    built as a list) peaked at ~3.5 GB on these; streaming stays around 1 GB, under a bound the texts alone
    exceed. (1.6M pairs: bench/assemble.py.)"""
    out = tmp_path / "out"
    text_bytes = _long_parts(out, shards=100, pairs=4000, words=300)
    bound_mb = 1500
    assert text_bytes / 2**20 > bound_mb  # holding the texts once would already break the bound
    shards = [f"{s:05d}" for s in range(100)]
    # two threads, as on the 2-core machine the bound was set on: polars keeps more batches in flight with more
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(out), json.dumps(shards)], capture_output=True,
                          text=True, check=True, env={**os.environ, "POLARS_MAX_THREADS": "2"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pairs"] == 400_000
    assert result["peak_mb"] < bound_mb, result
    # and streamed in order: the manifest is the parts, shard by shard, in key order
    keys = pl.scan_parquet(out / "manifest.parquet").select("shard", "key").collect()
    assert keys["shard"].is_sorted() and keys.height == 400_000
    assert keys.filter(pl.col("shard") == "00042")["key"].to_list() == sorted(
        pl.read_parquet(out / "parts" / "00042.parquet", columns=["key"])["key"].to_list())


def test_manifest_over_many_row_groups_is_write_parquets_bytes_and_thread_independent(tmp_path):
    out = tmp_path / "out"
    _long_parts(out, shards=3, pairs=30_000, words=8)  # 90,000 rows: two row groups of at most 65,536
    shards = ["00000", "00001", "00002"]
    assemble_dataset(out, shards)
    expected = tmp_path / "expected.parquet"
    write_parquet(pl.concat([pl.read_parquet(out / "parts" / f"{s}.parquet") for s in shards]), expected)
    assert (out / "manifest.parquet").read_bytes() == expected.read_bytes()
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    subprocess.run([sys.executable, "-c", MEASURE, str(out), json.dumps(shards)], check=True, capture_output=True,
                   env={**os.environ, "POLARS_MAX_THREADS": "1"})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first


def _assemble_fails(out: Path, shards: list[str], message: str) -> None:
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PathgenError, match=message) as err:
        assemble_dataset(out, shards)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written, nothing left


def test_dataset_errors_name_the_culprit_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    shards = irregular_parts(out)
    part = pl.read_parquet(out / "parts" / "00002.parquet")
    other = pl.read_parquet(out / "parts" / "00004.parquet")

    write_part(out, "00004", pl.concat([other, part.head(2).with_columns(shard=pl.lit("00004"))]),
               min_clip_score=IRREGULAR_MIN_CLIP_SCORE)
    _assemble_fails(out, shards, re.escape(f"key '{part['key'][0]}' is in more than one shard"))
    write_part(out, "00004", pl.concat([other, other]), min_clip_score=IRREGULAR_MIN_CLIP_SCORE)  # twice in one part
    _assemble_fails(out, shards, re.escape(f"key '{other['key'][0]}' is in more than one shard"))
    write_part(out, "00004", other, min_clip_score=0.2)  # the shard of another params.yaml
    _assemble_fails(out, shards, re.escape("shard 00000 was assembled with assemble.min_clip_score 0.01 but shard "
                                           "00004 with 0.2; re-assemble"))
    slides_path = out / "parts" / "00004.slides.json"
    slides_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "pairs_below_min_clip_score"}
                                       for r in json.loads(slides_path.read_text())]))
    _assemble_fails(out, shards, r"shard 00004: .*00004\.slides\.json has no clip score filter or quality control counts")
    write_part(out, "00004", other, min_clip_score=IRREGULAR_MIN_CLIP_SCORE)

    write_parquet(part.drop("summary_cut"), out / "parts" / "00002.parquet")
    _assemble_fails(out, shards, r"shard 00002: .*00002\.parquet does not have the assembled part schema")
    write_parquet(part.with_columns(pl.col("x").cast(pl.Int32)), out / "parts" / "00002.parquet")
    _assemble_fails(out, shards, r"shard 00002: .*00002\.parquet does not have the assembled part schema")
    (out / "parts" / "00002.parquet").write_bytes(b"PAR1 not parquet")
    _assemble_fails(out, shards, r"shard 00002: .*00002\.parquet is not a readable parquet file")
    write_parquet(part.with_columns(key=pl.lit(None, pl.String)), out / "parts" / "00002.parquet")
    _assemble_fails(out, shards, r"shard 00002: .*00002\.parquet has 25 row\(s\) without a key")
    negative = part.with_columns(summary_tokens=pl.when(pl.col("key") == part["key"][3]).then(-3)
                                 .otherwise(pl.col("summary_tokens")).cast(pl.Int32))
    write_parquet(negative, out / "parts" / "00002.parquet")
    _assemble_fails(out, shards, re.escape(f"shard 00002, key '{part['key'][3]}': summary_tokens -3 is negative"))
    write_parquet(part, out / "parts" / "00002.parquet")

    (out / "00003.tar").unlink()
    _assemble_fails(out, shards, r"shard 00003: .*00003\.tar not found; assemble the shard first")
    (out / "parts" / "00001.parquet").unlink()  # the first missing shard in shard order is named
    _assemble_fails(out, shards, r"shard 00001: .*parts/00001\.parquet not found; assemble the shard first")


def test_word_count_is_str_split_for_every_code_point():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"a{c}b {c}" for c in chars]
    counted = pl.DataFrame({"t": texts}).select(word_count("t"))["t"].to_list()
    assert [c for c, n, t in zip(chars, counted, texts) if n != len(t.split())] == []


def test_export_is_written_atomically(tmp_path):
    path = tmp_path / EXPORT_NAME
    path.write_text("previous\n")

    def records():
        yield {"wsi_id": "W", "position": ["0", "0"], "caption": "c", "file_id": None}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_pathgen_json(records(), path, batch=1)  # the first record is already written when it fails
    assert path.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == [EXPORT_NAME]
    write_pathgen_json(iter([{"wsi_id": "W", "position": ["0", "0"], "caption": "ç", "file_id": None}] * 3), path,
                       batch=2)
    assert path.read_text() == '[\n' + ',\n'.join(['{"wsi_id": "W", "position": ["0", "0"], "caption": "ç", '
                                                   '"file_id": null}'] * 3) + '\n]\n'
