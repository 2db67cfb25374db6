"""report-pages: the sample-pairs and dataset-plots pages of the Snakemake report, on a tiny assembled dataset."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pathgen.cli import main
from pathgen.errors import PathgenError
from pathgen.reporting.pages import (
    pick_order,
    plots_html,
    sample_pairs_html,
    select_pairs,
    write_report_pages,
)
from pathgen.steps.assemble import PART_SCHEMA, assemble_dataset
from pathgen.store.io import encode_jpeg, read_tar, write_parquet, write_tar
from pathgen.store.shards import pair_key

# shard -> slide -> number of pairs
LAYOUT = {"00000": {"slide-a": 5, "slide-b": 4}, "00001": {"slide-c": 3}}
TISSUE = {"slide-a": "lung", "slide-b": "breast", "slide-c": "colon"}
ARTICLE = re.compile(r'<article class="pair" data-key="([^"]+)">(.*?)</article>', re.S)
IMG = re.compile(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), 90)


def _row(shard: str, slide_id: str, i: int) -> dict:
    key = pair_key(slide_id, 672 * i, 0)
    description = f'Pair {slide_id}#{i}: cells <b>& "nuclei"</b> of {TISSUE[slide_id]} with \x16 noise.'
    applied = i % 2 == 0
    ops = [{"op": "edit", "sentence": f"cells <b>& \"nuclei\"</b> of {TISSUE[slide_id]}",
            "new": f"cells <i>& 'nuclei'</i> ({i})"}, {"op": "add", "sentence": "Stroma <is> fibrous."}]
    revised = (f"Pair {slide_id}#{i}: cells <i>& 'nuclei'</i> ({i}) with noise. Stroma <is> fibrous."
               if applied else description)
    return {
        "shard": shard, "key": key, "slide_id": slide_id, "tissue": TISSUE[slide_id], "project": None,
        "file_id": None, "x": 672 * i, "y": 0, "level": 0, "size": 672, "mpp": 0.25, "reasons": "cluster",
        "report_score": 0.1, "attribute_score": 0.2, "cluster": i, "clip_score": -0.25 + 0.05 * (i % 3),
        "description": description,
        "ops": json.dumps(ops if applied else []), "revised": revised,
        "revise_status": "applied" if applied else "unchanged",
        "summary": f"Summary of {slide_id}#{i} <with> 'quotes' & more.", "summary_tokens": 10 + 7 * i,
        "summary_cut": i == 3, "describe_fingerprint": "d", "revise_fingerprint": "r", "summarize_fingerprint": "s",
        "image_sha256": "",
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """An assembled dataset: shard tars (jpg/json/txt per pair), parts, then `assemble_dataset`'s files."""
    out = tmp_path_factory.mktemp("dataset")
    seed = 0
    for shard, slides in LAYOUT.items():
        rows, members = [], {}
        for slide_id, count in slides.items():
            for i in range(count):
                row = _row(shard, slide_id, i)
                seed += 1
                members[f"{row['key']}.jpg"] = _jpeg(seed)
                members[f"{row['key']}.json"] = b"{}"
                members[f"{row['key']}.txt"] = row["summary"].encode()
                rows.append(row)
        write_tar(members, out / f"{shard}.tar")
        part = pl.DataFrame(rows, schema=PART_SCHEMA, orient="row").sort("key")
        write_parquet(part, out / "parts" / f"{shard}.parquet")
    assemble_dataset(out, list(LAYOUT))
    return out


def _jpegs(dataset: Path) -> dict[str, bytes]:
    images = {}
    for shard in LAYOUT:
        members = read_tar(dataset / f"{shard}.tar")
        images.update({name[:-4]: data for name, data in members.items() if name.endswith(".jpg")})
    return images


def _esc(text: str) -> str:
    return html.escape(text.replace("\x16", "\u2416"), quote=True)


def test_samples_page_shows_n_pairs_with_shard_images_and_escaped_texts(dataset):
    page = sample_pairs_html(dataset, 5, seed=7)
    articles = ARTICLE.findall(page)
    assert len(articles) == 5
    manifest = {r["key"]: r for r in pl.read_parquet(dataset / "manifest.parquet").iter_rows(named=True)}
    images = _jpegs(dataset)
    for key, body in articles:
        row = manifest[html.unescape(key)]
        (data,) = IMG.findall(body)
        assert base64.b64decode(data) == images[row["key"]]
        assert _esc(row["description"]) in body
        assert _esc(row["revised"]) in body
        assert _esc(row["summary"]) in body
        assert f"{row['summary_tokens']} / 77 tokens" in body
        assert ("cut to fit" in body) == row["summary_cut"]
        assert f"status-{row['revise_status']}" in body
        if row["revise_status"] == "applied":
            for op in json.loads(row["ops"]):
                assert _esc(op.get("new", op["sentence"])) in body
    # five pairs over three slides: every slide shows one before any shows a third
    slides = [html.unescape(k).split("/")[0] for k, _ in articles]
    assert set(slides) == set(TISSUE) and max(slides.count(s) for s in TISSUE) == 2
    # the raw texts never appear unescaped; control characters are shown as symbols
    assert "<b>" not in page and "\x16" not in page and "\u2416" in page
    # self-contained: no script, no external resource
    assert "<script" not in page and "<link" not in page and not re.search(r'(src|href)="(?!data:)', page)


def test_selection_is_deterministic_spread_and_seeded(dataset):
    assert sample_pairs_html(dataset, 4, seed=3) == sample_pairs_html(dataset, 4, seed=3)
    manifest = pl.read_parquet(dataset / "manifest.parquet")
    picks = {seed: select_pairs(manifest, 4, seed) for seed in range(5)}
    assert len({tuple(p) for p in picks.values()}) > 1
    for keys in picks.values():
        assert len(keys) == 4 and keys == sorted(keys)
        assert {k.split("/")[0] for k in keys} == set(TISSUE)
    keys_of = lambda page: [k for k, _ in ARTICLE.findall(page)]  # noqa: E731
    assert keys_of(sample_pairs_html(dataset, 4, 0)) != keys_of(sample_pairs_html(dataset, 4, 1))
    # the order does not depend on the manifest's row order
    assert pick_order(manifest.reverse(), 3) == pick_order(manifest, 3)
    # n at least the number of pairs: all of them
    assert len(ARTICLE.findall(sample_pairs_html(dataset, 100, 0))) == manifest.height
    assert ARTICLE.findall(sample_pairs_html(dataset, 0, 0)) == []
    with pytest.raises(PathgenError, match=">= 0"):
        sample_pairs_html(dataset, -1, 0)


def test_byte_budget_leaves_out_the_last_picks(dataset):
    full = sample_pairs_html(dataset, 12, seed=5)
    budget = len(full.encode()) * 2 // 3
    page = sample_pairs_html(dataset, 12, seed=5, max_bytes=budget)
    keys = [html.unescape(k) for k, _ in ARTICLE.findall(page)]
    assert len(page.encode()) <= budget and 0 < len(keys) < 12
    order = pick_order(pl.read_parquet(dataset / "manifest.parquet"), 5)
    assert keys == sorted(order[: len(keys)])
    assert f"{12 - len(keys)} more of the 12 requested are left out" in page


def _bars(page: str, svg_id: str) -> list[ET.Element]:
    match = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S)
    assert match, svg_id
    svg = ET.fromstring(match.group(0))
    return [el for el in svg.iter("{http://www.w3.org/2000/svg}rect") if el.get("class") == "bar"]


def test_plots_page_draws_one_proportional_bar_per_row(dataset):
    page = plots_html(dataset)
    with open(dataset / "plots" / "caption_tokens.csv", newline="") as fh:
        tokens = [(int(r["tokens"]), int(r["count"])) for r in csv.DictReader(fh)]
    bars = _bars(page, "caption-tokens")
    assert len(bars) == len(tokens) >= 78
    assert [(int(b.get("data-tokens")), int(b.get("data-count"))) for b in bars] == tokens
    heights = [float(b.get("height")) for b in bars]
    scale = max(heights) / max(c for _, c in tokens)
    for (_, count), h in zip(tokens, heights):
        assert h == pytest.approx(count * scale, abs=0.01)
    bottoms = {round(float(b.get("y")) + float(b.get("height")), 2) for b in bars}
    assert len(bottoms) == 1  # all bars stand on the axis

    with open(dataset / "plots" / "clip_scores.csv", newline="") as fh:
        scores = [(r["clip_score"], int(r["pairs"])) for r in csv.DictReader(fh)]
    bars = _bars(page, "clip-scores")
    assert [(b.get("data-bin"), int(b.get("data-count"))) for b in bars] == scores and len(scores) == 100
    residues = [i % 3 for slides in LAYOUT.values() for count in slides.values() for i in range(count)]
    expected = {"-0.26": residues.count(0), "-0.20": residues.count(1), "-0.16": residues.count(2)}  # -0.25, -0.2, -0.15
    assert {s: c for s, c in scores if c} == expected
    heights = [float(b.get("height")) for b in bars]
    for (_, count), h in zip(scores, heights):
        assert h == pytest.approx(count * max(heights) / max(expected.values()), abs=0.01)
    assert len({round(float(b.get("y")) + float(b.get("height")), 2) for b in bars}) == 1

    with open(dataset / "plots" / "pairs_per_tissue.csv", newline="") as fh:
        tissues = [(r["tissue"], int(r["pairs"])) for r in csv.DictReader(fh)]
    bars = _bars(page, "pairs-per-tissue")
    assert [(b.get("data-tissue"), int(b.get("data-count"))) for b in bars] == tissues == [
        ("lung", 5), ("breast", 4), ("colon", 3)]
    widths = [float(b.get("width")) for b in bars]
    for (_, pairs), w in zip(tissues, widths):
        assert w == pytest.approx(pairs * widths[0] / tissues[0][1], abs=0.01)

    metrics = json.loads((dataset / "metrics.json").read_text())
    assert metrics["pairs"] == 12
    for key in metrics:
        assert f"<code>{key}</code>" in page
    assert "<script" not in page and not re.search(r'(src|href)="', page)
    assert plots_html(dataset) == page


def test_write_report_pages_and_cli(dataset, tmp_path):
    paths = write_report_pages(dataset, tmp_path / "a", 6, 11)
    assert sorted(paths) == ["plots.html", "samples.html"]
    assert main(["report-pages", "--dataset-dir", str(dataset), "--out-dir", str(tmp_path / "b"),
                 "--n", "6", "--seed", "11", "--log", str(tmp_path / "log")]) == 0
    for name in paths:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(ARTICLE.findall((tmp_path / "b" / "samples.html").read_text())) == 6
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["plots.html", "samples.html"]  # no temporaries


def test_missing_inputs_name_the_file(dataset, tmp_path):
    with pytest.raises(PathgenError, match="manifest.parquet not found"):
        sample_pairs_html(tmp_path, 3, 0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.parquet").write_bytes((dataset / "manifest.parquet").read_bytes())
    with pytest.raises(PathgenError, match=r"shard 0000\d: .*\.tar not found"):
        sample_pairs_html(broken, 3, 0)
    with pytest.raises(PathgenError, match="metrics.json not found"):
        plots_html(broken)
