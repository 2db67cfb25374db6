"""report-pages: two self-contained HTML pages of the assembled dataset for `snakemake --report`.

- `samples.html` (`sample_pairs_html`): n pairs picked deterministically from the
  manifest, spread over the slides; each shows its patch (the JPEG bytes of the
  shard tar, embedded as a base64 data URI) beside its description, its revision
  (status and the operations applied) and its summary with its token count.
- `plots.html` (`plots_html`): `metrics.json` as a table and the three plot CSVs
  (`plots/caption_tokens.csv`, `plots/clip_scores.csv`, `plots/pairs_per_tissue.csv`) as inline SVG bar
  charts.

Both pages are plain HTML with a small inline style sheet: no scripts, no
external resources, no timestamps, so the same dataset and seed give the same
bytes. Snakemake's report embeds them as they are.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.errors import PathgenError
from pathgen.reporting.html import esc, page, table
from pathgen.store.dataset import FAILURES_NAME
from pathgen.store.io import write_text
from pathgen.store.seeds import rng_for
from pathgen.store.tables import require_columns
from pathgen.text.tokens import CONTEXT_LENGTH

SAMPLES_NAME = "samples.html"
PLOTS_NAME = "plots.html"
# Snakemake's report shows an HTML result in an iframe whose src is a base64 data URI; Chromium
# refuses URLs over 2 MiB, i.e. pages over 1.5 MiB. The samples page is kept below this.
REPORT_PAGE_MAX_BYTES = 1_500_000
SAMPLE_COLUMNS = ("shard", "key", "slide_id", "tissue", "description", "ops", "revised", "revise_status",
                  "summary", "summary_tokens", "summary_cut")

# metrics.json keys in display order, with their labels; other keys follow, sorted, under their own name.
METRIC_LABELS = {
    "pairs": "Image–caption pairs",
    "slides": "Slides",
    "shards": "Shards",
    "summary_tokens_mean": "Summary tokens, mean",
    "summary_tokens_p95": "Summary tokens, 95th percentile",
    "summary_words_mean": "Summary words, mean",
    "description_words_mean": "Description words, mean",
    "description_tokens_mean": "Description tokens, mean",
    "pct_description_truncated": "Descriptions cut by describe.max_new_tokens",
    "pct_revised": "Descriptions revised (operations applied)",
    "pct_revise_unchanged": "Descriptions the revise agent left as they were",
    "pct_revise_invalid": "Revise answers that were not applicable operations",
    "pct_revise_unconstrained": "Revise answers decoded without their schema",
    "pct_summary_truncated": "Summaries cut by summarize.max_tokens",
    "pct_cut": f"Summaries cut at {CONTEXT_LENGTH} tokens",
    "complete": "Every shard assembled",
    "incomplete_shards": "Shards left out (jobs did not complete)",
    "slides_in_shards": "Slides in the assembled shards",
    "slides_quarantined": "Slides quarantined (input errors)",
    "slides_without_pairs": "Slides without pairs (no tissue kept)",
    "clip_score_mean": "CLIP score of patch and caption, mean",
    "clip_score_p05": "CLIP score, 5th percentile",
    "clip_score_p50": "CLIP score, median",
    "clip_score_p95": "CLIP score, 95th percentile",
    "min_clip_score": "Pairs left out below this CLIP score (assemble.min_clip_score)",
    "pairs_below_min_clip_score": "Pairs left out below min_clip_score",
}

STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px; background: #fff; color: #1f2328;
       font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 24px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h2 .meta, .lead { color: #59636e; font-weight: normal; font-size: 13px; }
h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #59636e; margin: 0 0 3px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.pair { display: grid; grid-template-columns: minmax(160px, 256px) 1fr; gap: 16px; padding: 12px;
        margin: 0 0 12px; border: 1px solid #d0d7de; border-radius: 6px; background: #f6f8fa; }
.pair figure { margin: 0; }
.pair img { display: block; width: 100%; height: auto; border-radius: 4px; border: 1px solid #d0d7de; }
.pair figcaption { margin-top: 4px; color: #59636e; font-size: 12px; overflow-wrap: anywhere; }
.texts { display: grid; gap: 10px; min-width: 0; }
.texts section { background: #fff; border: 1px solid #d8dee4; border-radius: 4px; padding: 6px 10px; }
.text { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { margin: 0; color: #59636e; font-style: italic; }
.badge { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 10px; font-size: 11px;
         text-transform: none; letter-spacing: 0; background: #eaeef2; color: #1f2328; }
.status-applied { background: #dafbe1; color: #116329; }
.status-unchanged { background: #ddf4ff; color: #0969da; }
.status-invalid { background: #fff1e5; color: #953800; }
.cut { background: #ffebe9; color: #a40e26; }
ol.ops { margin: 2px 0 6px; padding-left: 20px; }
ol.ops li { overflow-wrap: anywhere; }
.op { font-weight: 600; }
del { background: #ffebe9; color: #82071e; }
ins { background: #dafbe1; color: #116329; text-decoration: none; }
table.metrics { border-collapse: collapse; margin: 4px 0 8px; }
table.metrics th, table.metrics td { padding: 4px 12px; border-bottom: 1px solid #d8dee4; text-align: left; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
figure.chart { margin: 8px 0 20px; }
figure.chart figcaption { color: #59636e; font-size: 13px; }
svg { max-width: 100%; height: auto; font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
svg .bar { fill: #4c78a8; }
svg .bar:hover { fill: #2f5d8a; }
svg .grid { stroke: #d8dee4; stroke-width: 1; }
svg .axis { stroke: #59636e; stroke-width: 1; }
svg .limit { stroke: #cf222e; stroke-width: 1.5; stroke-dasharray: 4 3; }
svg text { font-size: 11px; fill: #59636e; }
svg text.value { fill: #1f2328; }
svg text.limit-label { fill: #cf222e; }
"""


# -- text helpers ---------------------------------------------------------------------------------

def _num(value: float) -> str:
    """A coordinate or length for SVG: fixed two decimals, no '-0.00'."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _page(title: str, body: str) -> str:
    return page(title, body, STYLE)


# -- sample pairs ---------------------------------------------------------------------------------

def _read_manifest(dataset_dir: Path) -> pl.DataFrame:
    path = dataset_dir / "manifest.parquet"
    if not path.is_file():
        raise PathgenError(f"{path} not found; assemble the dataset first")
    frame = pl.read_parquet(path)
    require_columns(frame.columns, SAMPLE_COLUMNS, str(path))
    return frame.select(SAMPLE_COLUMNS).sort("key")


def pick_order(manifest: pl.DataFrame, seed: int) -> list[str]:
    """Every key, in the order sample pairs are picked; a function of (keys, seed) only.

    Slides are visited round-robin in a seeded order, each contributing its
    pairs in a seeded per-slide order, so every slide has a pair before any has
    two: any prefix of this order is spread over the slides.
    """
    by_slide: dict[str, list[str]] = {}
    for key, slide_id in manifest.select("key", "slide_id").sort("key").iter_rows():
        by_slide.setdefault(slide_id, []).append(key)
    slides = sorted(by_slide)
    order = [slides[i] for i in rng_for(seed, "report-samples").permutation(len(slides))]
    queues = [[by_slide[s][i] for i in rng_for(seed, "report-samples", s).permutation(len(by_slide[s]))]
              for s in order]
    depth = max((len(q) for q in queues), default=0)
    return [q[d] for d in range(depth) for q in queues if d < len(q)]


def select_pairs(manifest: pl.DataFrame, n: int, seed: int) -> list[str]:
    """Keys of n pairs (all when fewer), spread over the slides (the first n of `pick_order`), sorted."""
    if n < 0:
        raise PathgenError(f"the number of sample pairs must be >= 0, got {n}")
    return sorted(pick_order(manifest, seed)[:n])


def _read_jpegs(dataset_dir: Path, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """The `{key}.jpg` bytes of each row, read from its shard's tar (each tar opened once)."""
    by_shard: dict[str, list[str]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row["key"])
    images: dict[str, bytes] = {}
    for shard in sorted(by_shard):
        path = dataset_dir / f"{shard}.tar"
        if not path.is_file():
            raise PathgenError(f"shard {shard}: {path} not found")
        with tarfile.open(path, "r") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for key in by_shard[shard]:
                info = members.get(f"{key}.jpg")
                if info is None:
                    raise PathgenError(f"shard {shard}, key '{key}': no member {key}.jpg in {path}")
                images[key] = tar.extractfile(info).read()
    return images


def _ops_html(ops_text: str | None, key: str) -> str:
    try:
        ops = json.loads(ops_text) if ops_text else []
    except json.JSONDecodeError as exc:
        raise PathgenError(f"key '{key}': ops is not JSON ({exc})") from None
    if not isinstance(ops, list):
        raise PathgenError(f"key '{key}': ops must be a JSON list, got {type(ops).__name__}")
    items = []
    for op in ops:
        if not isinstance(op, dict):
            items.append(f"<li><code>{esc(json.dumps(op, ensure_ascii=False))}</code></li>")
            continue
        kind = op.get("op")
        sentence, new = op.get("sentence"), op.get("new")
        if kind == "add":
            body = f"<ins>{esc(sentence)}</ins>"
        elif kind == "delete":
            body = f"<del>{esc(sentence)}</del>"
        elif kind == "edit":
            body = f"<del>{esc(sentence)}</del> → <ins>{esc(new)}</ins>"
        else:
            body = f"<code>{esc(json.dumps(op, sort_keys=True, ensure_ascii=False))}</code>"
        items.append(f'<li><span class="op">{esc(kind)}</span> {body}</li>')
    return f'<ol class="ops">{"".join(items)}</ol>' if items else ""


REVISE_NOTES = {
    "unchanged": "The revise agent found nothing to correct.",
    "invalid": "The revise agent's answer was not a valid list of operations; the description is kept.",
}


def _pair_html(row: dict[str, Any], image: bytes) -> str:
    key = row["key"]
    status = row["revise_status"] or ""
    revised = row["revised"]
    revision = [_ops_html(row["ops"], key)]
    if status in REVISE_NOTES:
        revision.append(f'<p class="note">{esc(REVISE_NOTES[status])}</p>')
    if revised is not None and revised != row["description"]:
        revision.append(f'<p class="text">{esc(revised)}</p>')
    elif status not in REVISE_NOTES:
        revision.append('<p class="note">The revised text is the description.</p>')
    tokens = row["summary_tokens"]
    token_badge = f'<span class="badge">{esc(tokens)} / {CONTEXT_LENGTH} tokens</span>'
    cut_badge = f'<span class="badge cut">cut to fit {CONTEXT_LENGTH}</span>' if row["summary_cut"] else ""
    data_uri = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
    return (
        f'<article class="pair" data-key="{esc(key)}">\n'
        f'<figure><img src="{data_uri}" alt="patch {esc(key)}">'
        f"<figcaption><code>{esc(key)}</code><br>{esc(row['tissue'])} · shard {esc(row['shard'])}"
        "</figcaption></figure>\n"
        '<div class="texts">\n'
        f'<section class="description"><h3>Description</h3><p class="text">{esc(row["description"])}</p></section>\n'
        f'<section class="revision"><h3>Revision <span class="badge status-{esc(status)}">{esc(status)}</span></h3>'
        f'{"".join(revision)}</section>\n'
        f'<section class="summary"><h3>Summary {token_badge}{cut_badge}</h3>'
        f'<p class="text">{esc(row["summary"])}</p></section>\n'
        "</div>\n</article>\n"
    )


def _samples_page(rows: list[dict[str, Any]], cards: dict[str, str], manifest: pl.DataFrame,
                  totals: dict[str, int], seed: int, requested: int, max_bytes: int | None) -> str:
    shown_note = ""
    if len(rows) < min(requested, manifest.height):
        shown_note = (f" {min(requested, manifest.height) - len(rows)} more of the {requested} requested are left "
                      f"out to keep this page under {max_bytes:,} bytes, the largest Chromium shows inside "
                      "the Snakemake report.")
    parts = [
        "<h1>Sample pairs</h1>\n",
        f'<p class="lead">{len(rows)} of {manifest.height} pairs from {len(totals)} slide(s), spread over the '
        f"slides (seed {esc(seed)}). Each patch as stored in its shard, beside the describe model's "
        f"description, the revise agent's corrections and the summary CLIP trains on.{esc(shown_note)}</p>\n",
    ]
    if not rows:
        parts.append('<p class="note">No pairs to show.</p>\n')
    current = None
    for row in rows:
        if row["slide_id"] != current:
            current = row["slide_id"]
            shown = sum(1 for r in rows if r["slide_id"] == current)
            parts.append(f'<h2>{esc(current)} <span class="meta">{esc(row["tissue"])} · {shown} of '
                         f"{totals[current]} pairs shown</span></h2>\n")
        parts.append(cards[row["key"]])
    return _page("Sample pairs", "".join(parts))


def sample_pairs_html(dataset_dir: str | Path, n: int, seed: int, max_bytes: int | None = None) -> str:
    """The sample-pairs page: n pairs of `dataset_dir` (see `select_pairs`), grouped by slide.

    With `max_bytes`, pairs are dropped from the end of `pick_order` until the
    UTF-8 page fits (the page says how many); images are never re-encoded.
    """
    dataset_dir = Path(dataset_dir)
    manifest = _read_manifest(dataset_dir)
    if n < 0:
        raise PathgenError(f"the number of sample pairs must be >= 0, got {n}")
    order = pick_order(manifest, seed)[:n]
    by_key = {r["key"]: r for r in manifest.filter(pl.col("key").is_in(order)).iter_rows(named=True)}
    images = _read_jpegs(dataset_dir, [by_key[k] for k in sorted(order)])
    cards = {k: _pair_html(by_key[k], images[k]) for k in order}
    totals = dict(manifest.group_by("slide_id").agg(pl.len()).iter_rows())
    k = len(order)
    while True:
        rows = [by_key[key] for key in sorted(order[:k])]
        page = _samples_page(rows, cards, manifest, totals, seed, n, max_bytes)
        if max_bytes is None or k == 0 or len(page.encode("utf-8")) <= max_bytes:
            return page
        k -= 1


# -- plots ----------------------------------------------------------------------------------------

def _read_csv(path: Path, columns: tuple[str, str], numeric_first: bool) -> list[tuple[Any, int]]:
    if not path.is_file():
        raise PathgenError(f"{path} not found; assemble the dataset first")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != columns:
            raise PathgenError(f"{path}: header must be {','.join(columns)}, got {','.join(header or [])}")
        rows = []
        for line, record in enumerate(reader, start=2):
            if not record:
                continue
            try:
                label = int(record[0]) if numeric_first else record[0]
                value = int(record[1])
            except (ValueError, IndexError):
                raise PathgenError(f"{path}, line {line}: expected {','.join(columns)} with integer "
                                   f"{columns[1]}, got {','.join(record)}") from None
            if value < 0:
                raise PathgenError(f"{path}, line {line}: negative {columns[1]} {value}")
            rows.append((label, value))
    return rows


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is >= value (1 for value <= 0)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10.0 ** exponent
        if top >= value * (1 - 1e-12):
            return top
    return 10.0 ** (exponent + 1)


def _ticks(top: float, count: int = 5) -> list[float]:
    step = nice_ceiling(top / count)
    ticks, value = [], 0.0
    while value <= top * (1 + 1e-9):
        ticks.append(value)
        value += step
    return ticks


def _tick_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _column_chart_svg(svg_id: str, aria_label: str, bars: list[tuple[str, int, str, str | None]], x_label: str,
                      tick_at_centre: bool, overlay=None) -> str:
    """Vertical bars, heights proportional to their counts, on a grid with a y scale. `bars`: per bar its
    data attributes, count, hover title and x tick label (None: no tick), the tick at the bar's centre or
    its left edge; `overlay(left, slot, top, base)` gives extra SVG lines drawn over the bars."""
    width, height = 760, 280
    left, right, top, bottom = 52, 12, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = nice_ceiling(max((c for _, c, _, _ in bars), default=0))
    slot = plot_w / max(len(bars), 1)
    base = top + plot_h
    out = [f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{aria_label}">']
    for tick in _ticks(peak):
        y = base - tick / peak * plot_h
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_num(y)}" y2="{_num(y)}"/>')
        out.append(f'<text x="{left - 6}" y="{_num(y + 4)}" text-anchor="end">{_tick_label(tick)}</text>')
    for i, (data, count, title, tick) in enumerate(bars):
        h = count / peak * plot_h
        x = left + i * slot + slot * 0.1
        out.append(f'<rect class="bar" {data} data-count="{count}" x="{_num(x)}" '
                   f'y="{_num(base - h)}" width="{_num(slot * 0.8)}" height="{_num(h)}">'
                   f"<title>{title}</title></rect>")
        if tick is not None:
            tx = left + (i + 0.5) * slot if tick_at_centre else left + i * slot
            out.append(f'<text x="{_num(tx)}" y="{base + 15}" text-anchor="middle">{tick}</text>')
    if overlay is not None:
        out.extend(overlay(left, slot, top, base))
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{base}" y2="{base}"/>')
    out.append(f'<text x="{left + plot_w / 2:.2f}" y="{height - 6}" text-anchor="middle">{x_label}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.2f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.2f})">pairs</text>')
    out.append("</svg>")
    return "\n".join(out)


def token_histogram_svg(rows: list[tuple[int, int]]) -> str:
    """Vertical bars, one per (tokens, count) row, heights proportional to count; the context limit dashed."""
    bars = [(f'data-tokens="{tokens}"', count, f"{tokens} tokens: {count} pair(s)",
             str(tokens) if tokens % 10 == 0 else None) for tokens, count in rows]
    limit = next((i for i, (t, _) in enumerate(rows) if t == CONTEXT_LENGTH), None)

    def context_line(left, slot, top, base):
        if limit is None:
            return []
        lx = left + (limit + 1) * slot
        return [f'<line class="limit" x1="{_num(lx)}" x2="{_num(lx)}" y1="{top}" y2="{base}"/>',
                f'<text class="limit-label" x="{_num(lx - 4)}" y="{top + 10}" text-anchor="end">'
                f"CLIP context: {CONTEXT_LENGTH} tokens</text>"]

    return _column_chart_svg("caption-tokens", "Caption token histogram", bars, "summary tokens", True, context_line)


def clip_score_histogram_svg(rows: list[tuple[str, int]]) -> str:
    """Vertical bars, one per (bin start, pairs) row of plots/clip_scores.csv, heights proportional to pairs."""
    bars = [(f'data-bin="{esc(start)}"', count, f"from {esc(start)}: {count} pair(s)",
             esc(start) if i % 10 == 0 else None) for i, (start, count) in enumerate(rows)]
    return _column_chart_svg("clip-scores", "CLIP score histogram", bars,
                             "cosine of patch and caption (retrieval CLIP)", False)


def tissue_bars_svg(rows: list[tuple[str, int]]) -> str:
    """Horizontal bars, one per (tissue, pairs) row in CSV order, lengths proportional to pairs."""
    width, label_w, right, row_h, top, bottom = 760, 140, 60, 26, 8, 28
    plot_w = width - label_w - right
    height = top + row_h * max(len(rows), 1) + bottom
    peak = nice_ceiling(max((c for _, c in rows), default=0))
    base = top + row_h * max(len(rows), 1)
    out = [f'<svg id="pairs-per-tissue" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="Pairs per tissue">']
    for tick in _ticks(peak):
        x = label_w + tick / peak * plot_w
        out.append(f'<line class="grid" x1="{_num(x)}" x2="{_num(x)}" y1="{top}" y2="{base}"/>')
        out.append(f'<text x="{_num(x)}" y="{base + 15}" text-anchor="middle">{_tick_label(tick)}</text>')
    for i, (tissue, pairs) in enumerate(rows):
        w = pairs / peak * plot_w
        y = top + i * row_h
        out.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.2f}" text-anchor="end">{esc(tissue)}</text>')
        out.append(f'<rect class="bar" data-tissue="{esc(tissue)}" data-count="{pairs}" x="{label_w}" '
                   f'y="{_num(y + 4)}" width="{_num(w)}" height="{row_h - 8}">'
                   f"<title>{esc(tissue)}: {pairs} pair(s)</title></rect>")
        out.append(f'<text class="value" x="{_num(label_w + w + 5)}" y="{y + row_h / 2 + 4:.2f}">{pairs}</text>')
    out.append(f'<line class="axis" x1="{label_w}" x2="{label_w}" y1="{top}" y2="{base}"/>')
    out.append("</svg>")
    return "\n".join(out)


def _metric_value(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(json.dumps(value, sort_keys=True, ensure_ascii=False))
    text = str(value) if isinstance(value, int) else f"{value:,.2f}"
    return f"{text} %" if key.startswith("pct_") else text


def metrics_table_html(metrics: dict[str, Any]) -> str:
    keys = [k for k in METRIC_LABELS if k in metrics] + sorted(k for k in metrics if k not in METRIC_LABELS)
    rows = "".join(
        f'<tr><th>{esc(METRIC_LABELS.get(k, k))}</th><td><code>{esc(k)}</code></td>'
        f'<td class="value">{_metric_value(k, metrics[k])}</td></tr>'
        for k in keys
    )
    return f'<table class="metrics"><tbody>{rows}</tbody></table>'


def plots_html(dataset_dir: str | Path) -> str:
    """The dataset page: metrics.json as a table, the token and CLIP score histograms and the pairs per tissue
    as SVG."""
    dataset_dir = Path(dataset_dir)
    metrics_path = dataset_dir / "metrics.json"
    if not metrics_path.is_file():
        raise PathgenError(f"{metrics_path} not found; assemble the dataset first")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PathgenError(f"{metrics_path}: not JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise PathgenError(f"{metrics_path}: must hold a JSON object")
    tokens = _read_csv(dataset_dir / "plots" / "caption_tokens.csv", ("tokens", "count"), numeric_first=True)
    tissues = _read_csv(dataset_dir / "plots" / "pairs_per_tissue.csv", ("tissue", "pairs"), numeric_first=False)
    scores = _read_csv(dataset_dir / "plots" / "clip_scores.csv", ("clip_score", "pairs"), numeric_first=False)
    body = (
        "<h1>Dataset</h1>\n"
        f'<p class="lead">{esc(metrics.get("pairs", "?"))} image–caption pairs from '
        f'{esc(metrics.get("slides", "?"))} slide(s) in {esc(metrics.get("shards", "?"))} shard(s).</p>\n'
        "<h2>Metrics <span class=\"meta\">metrics.json</span></h2>\n"
        f"{metrics_table_html(metrics)}\n"
        '<h2>Caption tokens <span class="meta">plots/caption_tokens.csv</span></h2>\n'
        f'<figure class="chart">{token_histogram_svg(tokens)}\n'
        "<figcaption>Pairs by the token count of their summary (CLIP's tokenizer); summaries longer than the "
        "context are cut at its limit.</figcaption></figure>\n"
        '<h2>CLIP scores <span class="meta">plots/clip_scores.csv</span></h2>\n'
        f'<figure class="chart">{clip_score_histogram_svg(scores)}\n'
        "<figcaption>Pairs by the cosine similarity of patch and caption under the retrieval CLIP, in bins "
        "0.02 wide (pairs below assemble.min_clip_score are not in the dataset).</figcaption></figure>\n"
        '<h2>Pairs per tissue <span class="meta">plots/pairs_per_tissue.csv</span></h2>\n'
        f'<figure class="chart">{tissue_bars_svg(tissues)}\n'
        "<figcaption>Pairs per tissue, most first.</figcaption></figure>\n"
        f"{failures_html(dataset_dir / FAILURES_NAME)}"
    )
    return _page("Dataset plots", body)


def failures_html(path: Path) -> str:
    """The quarantined slides and left-out shards of failures.tsv as a table ('' without the file)."""
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = (lines[0].split("\t"), [line.split("\t") for line in lines[1:]]) if lines else ([], [])
    if not rows:
        return '<h2>Failures <span class="meta">failures.tsv</span></h2>\n<p class="lead">None: every slide ran.</p>\n'
    return (f'<h2>Failures: {len(rows)} <span class="meta">failures.tsv</span></h2>\n'
            '<p class="lead">Slides quarantined for an input error (their pairs are missing from the dataset) '
            "and shards left out because a job did not complete.</p>\n" + table(header, rows, "metrics"))


def write_report_pages(dataset_dir: str | Path, out_dir: str | Path, n: int, seed: int,
                       max_bytes: int | None = None) -> dict[str, Path]:
    """Write `samples.html` and `plots.html` into `out_dir`, atomically; return their paths by name.

    `max_bytes` bounds the samples page (see `sample_pairs_html`); `REPORT_PAGE_MAX_BYTES`
    keeps it viewable inside a Snakemake report.
    """
    out_dir = Path(out_dir)
    pages = {SAMPLES_NAME: sample_pairs_html(dataset_dir, n, seed, max_bytes), PLOTS_NAME: plots_html(dataset_dir)}
    paths = {}
    for name, text in pages.items():
        write_text(text, out_dir / name)
        paths[name] = out_dir / name
    return paths
