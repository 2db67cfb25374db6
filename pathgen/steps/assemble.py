"""assemble: join a shard's patches and captions into a WebDataset shard, then the whole dataset.

Per shard (`assemble_shard`), for every kept patch of the shard's slides:

- `{key}.jpg`: the patch bytes, copied unchanged from `data/patches/{slide}.tar`;
- `{key}.txt`: the summary (the caption CLIP trains on), UTF-8, as written;
- `{key}.json`: provenance (selection, description, revision, summary, fingerprints) and the
  pair's `clip_score`.

Members are in key order (`{slide_id}/x{X:07d}_y{Y:07d}`), each pair's three
members together, so WebDataset groups them into one sample whose `__key__`
is the key. The same rows go to `parts/{shard}.parquet`.

The shard's slides and how their jobs ended (ok or quarantined, with the
step and reason; pathgen.store.status) go to `parts/{shard}.slides.json`.

`clip_score` is the cosine similarity, under the retrieval CLIP (params.yaml
`clip`), of the patch's stored image feature (`data/embeddings/{slide}.zarr`,
the `features` row whose `coords` are the pair's x, y; the store must have
been embedded with that CLIP) and the text feature of its summary, computed in
float64 and rounded to 6 decimals (`CLIP_SCORE_DECIMALS`), so float noise
cannot change a byte. The stored features are float16, so both vectors are
renormalised: a cosine, not select's raw dot. Text features come through the
item cache (agent `clip-text`, as select's prompts): a shard whose summaries
were all seen before loads no CLIP; a missing text is encoded on CPU, alone.
With `assemble.min_clip_score` set, a pair whose (rounded) score is below it
is left out of the shard (neither tar nor part); each slide's record in
`parts/{shard}.slides.json` counts them (`pairs_below_min_clip_score`) and
names the threshold, and the dataset's metrics sum them.

For the dataset (`assemble_dataset`): `manifest.parquet`, `sizes.json` (read by
open_clip's trainer), `metrics.json`, plot data under `plots/`, an export in
the released PathGen-1.6M JSON format (`pathgen-1.6m.json`), and
`failures.tsv`: every quarantined slide, and every shard left out because its
jobs did not complete (`incomplete`: the run's failed jobs, passed by the
workflow's onerror handler, so that a failed run still leaves the dataset of
what succeeded, never the previous build's).

`assemble_dataset` streams over the parts and never holds the dataset's texts:
the manifest is a parquet sink over lazy scans of the parts (in shard order,
each in key order), metrics and plots are aggregations (exact integer sums,
the summary_tokens histogram, p95 as np.percentile computes it from that
histogram; the clip_score statistics likewise from the histogram of the
scores in millionths, exact integers, so mean and percentiles do not depend
on summation order), the export is written part by part, and keys are checked unique
by a streaming group-by. About 0.9 GB peak RSS for 1.6M pairs of 100-300-word
texts, where holding them took 11 GB (bench/assemble.py); the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from pathgen.errors import PathgenError
from pathgen.interop.pathgen_json import pathgen_records, write_pathgen_json
from pathgen.store.dataset import EXPORT_NAME, FAILURES_NAME, METRICS_NAME, PLOTS
from pathgen.store.io import PARQUET_SETTINGS, atomic_path, tar_member, write_json, write_parquet, write_text
from pathgen.store.manifest import SlideEntry
from pathgen.store.patch_tars import member_name
from pathgen.store.shards import pair_key
from pathgen.store.status import QUARANTINED, read_status
from pathgen.store.tables import require_columns, require_unique
from pathgen.wsi.quality import QC_PREFIX, REASONS

PART_SCHEMA = {
    "shard": pl.String,
    "key": pl.String,
    "slide_id": pl.String,
    "tissue": pl.String,
    "project": pl.String,
    "file_id": pl.String,  # TCGA file id when the manifest has one
    "x": pl.Int64,
    "y": pl.Int64,
    "level": pl.Int32,
    "size": pl.Int32,
    "mpp": pl.Float64,
    "reasons": pl.String,
    "report_score": pl.Float32,
    "attribute_score": pl.Float32,
    "cluster": pl.Int32,
    "description": pl.String,
    "ops": pl.String,  # JSON list of revision operations
    "revised": pl.String,
    "revise_status": pl.String,
    "summary": pl.String,
    "summary_tokens": pl.Int32,
    "summary_cut": pl.Boolean,
    # cosine of the patch's CLIP image feature and the summary's text feature, 6 decimals (module doc)
    "clip_score": pl.Float32,
    # how each text was made: engine, why generation stopped ("stop" | "length"), tokens generated
    "describe_engine": pl.String,
    "describe_finish": pl.String,
    "describe_tokens": pl.Int32,
    "revise_engine": pl.String,
    "revise_constrained": pl.Boolean,
    "revise_finish": pl.String,
    "summarize_engine": pl.String,
    "summarize_finish": pl.String,
    "describe_fingerprint": pl.String,
    "revise_fingerprint": pl.String,
    "summarize_fingerprint": pl.String,
    "image_sha256": pl.String,
}

CAPTION_COLUMNS = ("key", "slide_id", "x", "y", "description", "describe_engine", "describe_finish", "describe_tokens",
                   "describe_fingerprint")
REVISED_COLUMNS = ("key", "ops", "revised", "revise_status", "revise_engine", "revise_constrained", "revise_finish",
                   "revise_fingerprint")
SUMMARY_COLUMNS = ("key", "summary", "summary_tokens", "summary_cut", "summarize_engine", "summarize_finish",
                   "summarize_fingerprint")
CLIP_SCORE_DECIMALS = 6
MICRO = 10**CLIP_SCORE_DECIMALS  # scores in millionths are exact integers: what the statistics are computed on


def shard_inputs(shard: str, slide_ids: list[str], data_dir: str | Path) -> dict[str, list[Path]]:
    """The input files of `assemble_shard`, by kind (patches, selection, tiles, embeddings, captions, revised,
    summaries)."""
    data_dir = Path(data_dir)
    return {
        "patches": [data_dir / "patches" / f"{s}.tar" for s in slide_ids],
        "embeddings": [data_dir / "embeddings" / f"{s}.zarr" for s in slide_ids],
        "selection": [data_dir / "selection" / f"{s}.parquet" for s in slide_ids],
        "tiles": [data_dir / "tiles" / f"{s}.json" for s in slide_ids],
        "captions": [data_dir / "captions" / f"{shard}.parquet"],
        "revised": [data_dir / "revised" / f"{shard}.parquet"],
        "summaries": [data_dir / "summaries" / f"{shard}.parquet"],
    }


def _read_table(path: Path, columns: tuple[str, ...], shard: str) -> pl.DataFrame:
    if not path.is_file():
        raise PathgenError(f"shard {shard}: input {path} not found")
    frame = pl.read_parquet(path)
    require_columns(frame.columns, columns, f"shard {shard}: {path}")
    require_unique(frame, "key", f"shard {shard}: {path}")
    return frame.select(columns)


def _slide_of(key: str) -> str:
    return key.split("/", 1)[0]


def _pair_rows(shard: str, slides: list[SlideEntry], data_dir: Path) -> list[dict[str, Any]]:
    """Joined, checked rows of every pair of the shard, in key order (image bytes not yet read)."""
    files = shard_inputs(shard, [s.slide_id for s in slides], data_dir)
    captions = _read_table(files["captions"][0], CAPTION_COLUMNS, shard)
    revised = {r["key"]: r for r in _read_table(files["revised"][0], REVISED_COLUMNS, shard).iter_rows(named=True)}
    summaries = {r["key"]: r for r in _read_table(files["summaries"][0], SUMMARY_COLUMNS, shard).iter_rows(named=True)}
    entries = {s.slide_id: s for s in slides}

    selected: dict[str, dict[str, Any]] = {}
    mpp: dict[str, float | None] = {}
    for entry, sel_path, tile_path in zip(slides, files["selection"], files["tiles"]):
        where = f"shard {shard}, slide '{entry.slide_id}'"
        for path in (sel_path, tile_path):
            if not path.is_file():
                raise PathgenError(f"{where}: input {path} not found")
        info = json.loads(tile_path.read_text(encoding="utf-8"))
        mpp[entry.slide_id] = info.get("mpp")
        kept = pl.read_parquet(sel_path).filter(pl.col("kept"))
        for row in kept.iter_rows(named=True):
            selected[pair_key(entry.slide_id, int(row["x"]), int(row["y"]))] = row

    rows: list[dict[str, Any]] = []
    for cap in captions.sort("key").iter_rows(named=True):
        key = cap["key"]
        slide_id = _slide_of(key)
        where = f"shard {shard}, slide '{slide_id}', key '{key}'"
        if slide_id not in entries:
            raise PathgenError(f"{where}: captions row for a slide not in this shard ({files['captions'][0]})")
        if cap["slide_id"] != slide_id or pair_key(slide_id, int(cap["x"]), int(cap["y"])) != key:
            raise PathgenError(f"{where}: captions row says slide '{cap['slide_id']}' at ({cap['x']}, {cap['y']}), "
                               "which is not its key")
        sel = selected.get(key)
        if sel is None:
            raise PathgenError(f"{where}: captioned but not a kept patch of data/selection/{slide_id}.parquet")
        rev = revised.get(key)
        if rev is None:
            raise PathgenError(f"{where}: missing row in {files['revised'][0]}")
        summ = summaries.get(key)
        if summ is None:
            raise PathgenError(f"{where}: missing row in {files['summaries'][0]}")
        try:
            ops = json.loads(rev["ops"]) if rev["ops"] is not None else []
        except json.JSONDecodeError as exc:
            raise PathgenError(f"{where}: ops is not JSON ({exc})") from None
        if not isinstance(ops, list):
            raise PathgenError(f"{where}: ops must be a JSON list, got {type(ops).__name__}")
        if not summ["summary"] or not summ["summary"].strip():
            raise PathgenError(f"{where}: empty summary in {files['summaries'][0]}")
        entry = entries[slide_id]
        rows.append({
            "shard": shard,
            "key": key,
            "slide_id": slide_id,
            "tissue": entry.tissue,
            "project": entry.project,
            "file_id": getattr(entry, "file_id", None),
            "x": int(sel["x"]),
            "y": int(sel["y"]),
            "level": sel["level"],
            "size": sel["size"],
            "mpp": mpp[slide_id],
            "reasons": sel["reasons"],
            "report_score": sel["report_score"],
            "attribute_score": sel["attribute_score"],
            "cluster": sel["cluster"],
            "description": cap["description"],
            "ops": ops,
            "revised": rev["revised"],
            "revise_status": rev["revise_status"],
            "summary": summ["summary"],
            "summary_tokens": summ["summary_tokens"],
            "summary_cut": summ["summary_cut"],
            **{c: cap[c] for c in ("describe_engine", "describe_finish", "describe_tokens")},
            **{c: rev[c] for c in ("revise_engine", "revise_constrained", "revise_finish")},
            **{c: summ[c] for c in ("summarize_engine", "summarize_finish")},
            "describe_fingerprint": cap["describe_fingerprint"],
            "revise_fingerprint": rev["revise_fingerprint"],
            "summarize_fingerprint": summ["summarize_fingerprint"],
        })

    uncaptioned = sorted(set(selected) - {r["key"] for r in rows})
    if uncaptioned:
        key = uncaptioned[0]
        raise PathgenError(f"shard {shard}, slide '{_slide_of(key)}', key '{key}': kept patch with no row in "
                           f"{files['captions'][0]} ({len(uncaptioned)} such)")
    return rows


def pair_json(row: dict[str, Any]) -> dict[str, Any]:
    """The `{key}.json` record of a pair row (ops as a list, fingerprints nested)."""
    out = {k: row[k] for k in PART_SCHEMA if k not in ("shard", "key") and not k.endswith("_fingerprint")}
    out["fingerprints"] = {
        "describe": row["describe_fingerprint"],
        "revise": row["revise_fingerprint"],
        "summarize": row["summarize_fingerprint"],
    }
    return out


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _SlideTars:
    """Per-slide patch tars opened on demand, one at a time, members looked up by name."""

    def __init__(self, shard: str, data_dir: Path):
        self.shard, self.data_dir = shard, data_dir
        self.slide_id: str | None = None
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}

    def read(self, slide_id: str, name: str, key: str) -> bytes:
        if slide_id != self.slide_id:
            self.close()
            path = self.data_dir / "patches" / f"{slide_id}.tar"
            if not path.is_file():
                raise PathgenError(f"shard {self.shard}, slide '{slide_id}': input {path} not found")
            self.tar = tarfile.open(path, "r")
            self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}
            self.slide_id = slide_id
        info = self.members.get(name)
        if info is None:
            raise PathgenError(f"shard {self.shard}, slide '{slide_id}', key '{key}': no member {name} in "
                               f"{self.data_dir / 'patches' / f'{slide_id}.tar'}")
        return self.tar.extractfile(info).read()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        self.tar, self.slide_id, self.members = None, None, {}


def clip_scores(shard: str, rows: list[dict[str, Any]], data_dir: Path, clip_cfg: dict[str, Any],
                cache_dir: str | Path | None = None, flush_every: int = 32,
                info: dict[str, Any] | None = None) -> list[float]:
    """The `clip_score` of each row (module docstring), in row order.

    Reads the embeddings store of each slide that has rows, one at a time, keeping only the rows' features.
    A missing store, a store embedded with another CLIP (its attrs' model_fingerprint), a pair whose
    coords are no row of the store, or features of another width than the text features raise
    PathgenError naming the shard, slide (and key). `info` receives the text cache counters, whether the
    CLIP was loaded, and the number of distinct summaries.
    """
    # Imported here: open_clip and torch (~700 MB resident) are for the shard job, not for assemble_dataset.
    from pathgen.models.clip import cached_clip_texts, clip_fingerprint
    from pathgen.models.fingerprint import hash_store
    from pathgen.store.embeddings import read_embeddings

    info = {} if info is None else info
    if not rows:
        info.update(cache=None, clip_loaded=False, texts=0)
        return []
    store = hash_store(cache_dir) if cache_dir is not None else None
    fingerprint, _ = clip_fingerprint(clip_cfg, store)
    by_slide: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_slide.setdefault(row["slide_id"], []).append(i)
    image: list[np.ndarray | None] = [None] * len(rows)
    for slide_id, indices in by_slide.items():
        path = data_dir / "embeddings" / f"{slide_id}.zarr"
        where = f"shard {shard}, slide '{slide_id}'"
        if not path.exists():
            raise PathgenError(f"{where}: input {path} not found")
        features, coords, attrs = read_embeddings(path)
        theirs = attrs.get("model_fingerprint")
        if theirs != fingerprint:
            raise PathgenError(f"{where}: {path} was embedded with a different CLIP (fingerprint "
                               f"{str(theirs)[:12]}) than params.yaml clip names ({clip_cfg['checkpoint']}, "
                               f"fingerprint {fingerprint[:12]}); re-run embed")
        row_of: dict[tuple[int, int], int] = {}
        for r, (x, y) in enumerate(coords.tolist()):
            row_of.setdefault((int(x), int(y)), r)
        for i in indices:
            x, y = rows[i]["x"], rows[i]["y"]
            r = row_of.get((x, y))
            if r is None:
                raise PathgenError(f"{where}, key '{rows[i]['key']}': no row of {path} has coords ({x}, {y})")
            image[i] = features[r].copy()
        del features, coords
    texts = sorted({row["summary"] for row in rows})
    text_features = cached_clip_texts(clip_cfg, fingerprint, texts, cache_dir, flush_every, info)
    info["texts"] = len(texts)
    img = np.stack(image).astype(np.float64)
    if img.shape[1] != text_features.shape[1]:
        slide_id = rows[0]["slide_id"]
        raise PathgenError(f"shard {shard}, slide '{slide_id}': {data_dir / 'embeddings' / f'{slide_id}.zarr'} "
                           f"has {img.shape[1]}-dimensional features but the CLIP's text features have "
                           f"{text_features.shape[1]}; re-run embed")
    text_row = {text: i for i, text in enumerate(texts)}
    txt = text_features.astype(np.float64)[[text_row[row["summary"]] for row in rows]]
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = (img * txt).sum(axis=1) / (np.sqrt((img * img).sum(axis=1)) * np.sqrt((txt * txt).sum(axis=1)))
    bad = np.flatnonzero(~np.isfinite(cosine))
    if len(bad):
        row = rows[int(bad[0])]
        raise PathgenError(f"shard {shard}, slide '{row['slide_id']}', key '{row['key']}': its feature in "
                           f"{data_dir / 'embeddings' / (row['slide_id'] + '.zarr')} or its summary's text "
                           "feature is zero or not finite")
    return [round(float(c), CLIP_SCORE_DECIMALS) + 0.0 for c in cosine]  # + 0.0: no -0.0


def assemble_shard(shard: str, slides: list[SlideEntry], data_dir: str | Path, out_dir: str | Path,
                   params: dict[str, Any], cache_dir: str | Path | None = None, flush_every: int = 32,
                   info: dict[str, Any] | None = None) -> pl.DataFrame:
    """Write `out_dir/{shard}.tar` (WebDataset) and `out_dir/parts/{shard}.parquet`; return the part rows.

    `params`: params.yaml's `clip` and `assemble` sections. Each pair gets its `clip_score` (`clip_scores`,
    text features through the item cache under `cache_dir`); with `assemble.min_clip_score` set, pairs
    scoring below it are left out and counted per slide in `parts/{shard}.slides.json`. `info` receives
    the counters: pairs, pairs_below_min_clip_score, text cache, clip_loaded.

    A missing input file, a captioned key without a kept selection row, a
    revised/summary row, a tar member or an embeddings row, or a kept patch without captions
    raises PathgenError naming the shard, slide and key.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    info = {} if info is None else info
    threshold = params["assemble"]["min_clip_score"]
    rows = _pair_rows(shard, slides, data_dir)
    scores = clip_scores(shard, rows, data_dir, params["clip"], cache_dir, flush_every, info)
    below: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    for row, score in zip(rows, scores):
        row["clip_score"] = score
        if threshold is not None and score < threshold:
            below[row["slide_id"]] = below.get(row["slide_id"], 0) + 1
        else:
            kept.append(row)
    rows = kept
    info.update(pairs=len(rows), pairs_below_min_clip_score=sum(below.values()))
    tars = _SlideTars(shard, data_dir)
    try:
        with atomic_path(out_dir / f"{shard}.tar") as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
                for row in rows:  # key order; per key: .jpg < .json < .txt
                    image = tars.read(row["slide_id"], member_name(row["x"], row["y"]), row["key"])
                    row["image_sha256"] = hashlib.sha256(image).hexdigest()
                    members = (("jpg", image), ("json", _json_bytes(pair_json(row))), ("txt", row["summary"].encode("utf-8")))
                    for ext, data in members:
                        out.addfile(tar_member(f"{row['key']}.{ext}", len(data)), io.BytesIO(data))
    finally:
        tars.close()
    part = pl.DataFrame(
        [{**row, "ops": json.dumps(row["ops"], sort_keys=True, ensure_ascii=False)} for row in rows],
        schema=PART_SCHEMA,
        orient="row",
    )
    write_json(shard_slide_records(shard, slides, data_dir, part, below, threshold),
               out_dir / "parts" / f"{shard}.slides.json")
    write_parquet(part, out_dir / "parts" / f"{shard}.parquet")
    return part


def shard_slide_records(shard: str, slides: list[SlideEntry], data_dir: Path, part: pl.DataFrame,
                        below: dict[str, int] | None = None, min_clip_score: float | None = None) -> list[dict]:
    """Each slide of the shard with its pair count, its select job's status (ok when it has none), the pairs
    left out below `min_clip_score` (`below`: slide -> count) and that threshold, its tissue patches and
    how many of them quality control left out, by reason (its selection's `qc:<reason>` rows)."""
    pairs = dict(part.group_by("slide_id").agg(pl.len()).iter_rows()) if part.height else {}
    out = []
    for entry in slides:
        path = data_dir / "patches" / f"{entry.slide_id}.status.json"
        rec = read_status(path) if path.is_file() else {"status": "ok", "step": None, "reason": None}
        info = json.loads((data_dir / "tiles" / f"{entry.slide_id}.json").read_text(encoding="utf-8"))
        reasons = pl.read_parquet(data_dir / "selection" / f"{entry.slide_id}.parquet", columns=["drop_reason"])
        qc = reasons.filter(pl.col("drop_reason").str.starts_with(QC_PREFIX))["drop_reason"].to_list()
        out.append({"slide_id": entry.slide_id, "shard": shard, "status": rec["status"], "step": rec["step"],
                    "reason": rec["reason"], "pairs": int(pairs.get(entry.slide_id, 0)),
                    "pairs_below_min_clip_score": int((below or {}).get(entry.slide_id, 0)),
                    "min_clip_score": min_clip_score, "tissue_patches": int(info.get("patches", 0)),
                    "qc_excluded": {r[len(QC_PREFIX):]: qc.count(r) for r in sorted(set(qc))}})
    return out


def qc_metrics(slide_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tissue patches of the dataset's slides, and the share of them quality control left out, per reason
    (percent of tissue patches) and in all."""
    tissue = sum(int(r.get("tissue_patches", 0)) for r in slide_records)
    excluded = {reason: sum(int(r["qc_excluded"].get(reason, 0)) for r in slide_records) for reason in REASONS}
    unknown = sorted({k for r in slide_records for k in r["qc_excluded"]} - set(REASONS))
    if unknown:
        raise PathgenError(f"quality control reason '{unknown[0]}' in a shard's slides.json is not one of "
                           f"{', '.join(REASONS)}")

    def pct(n: int) -> float | None:
        return round(100.0 * n / tissue, 6) if tissue else None

    return {"tissue_patches": tissue, "patches_qc_excluded": sum(excluded.values()),
            "pct_qc_excluded": pct(sum(excluded.values())), **{f"pct_qc_{k}": pct(v) for k, v in excluded.items()}}


# A word of a text is what str.split() separates: a run of characters that are not whitespace as Python's
# str.isspace() defines it, which is Unicode White_Space (the regex \s) plus the separators U+001C..U+001F.
WORD = r"[^\s\x1c-\x1f]+"


def word_count(column: str) -> pl.Expr:
    """The words of each text of `column`, `len(text.split())` (0 for a null text)."""
    return pl.col(column).str.count_matches(WORD).fill_null(0)


def percentile_of_counts(counts: list[tuple[int, int]], q: float) -> float | None:
    """`np.percentile(values, q)` (linear interpolation) from (value, count) pairs of integer values, bit for bit.

    Follows numpy's arithmetic: virtual index (n - 1) * (q / 100), the two order statistics around it, and
    numpy's lerp (from the upper one when the weight is >= 0.5). None when there are no values.
    """
    items = sorted((int(v), int(c)) for v, c in counts if c)
    n = sum(c for _, c in items)
    if not n:
        return None

    def value_at(rank: int) -> float:
        seen = 0
        for value, count in items:
            seen += count
            if rank < seen:
                return float(value)
        raise AssertionError(rank)

    index = (n - 1) * (q / 100)
    if index >= n - 1:
        return float(items[-1][0])
    lower = math.floor(index)
    gamma = index - lower
    a, b = value_at(lower), value_at(lower + 1)
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def _mean_of(total: int, nulls: int, n: int) -> float | None:
    """The mean of n integer values summing to `total` (NaN when some are null, as numpy gives for NaN)."""
    if not n:
        return None
    return math.nan if nulls else total / n  # an exact integer sum, divided once: what numpy's mean gives


def _negative_tokens(lazy: pl.LazyFrame) -> None:
    """PathgenError naming the first pair (shard, key) whose summary_tokens is negative."""
    bad = lazy.select("shard", "key", "summary_tokens").filter(pl.col("summary_tokens") < 0).head(1).collect()
    shard, key, tokens = bad.row(0)
    raise PathgenError(f"shard {shard}, key '{key}': summary_tokens {tokens} is negative")


def dataset_metrics(manifest: pl.DataFrame | pl.LazyFrame, shards: list[str]) -> dict[str, Any]:
    """Summary statistics of the assembled pairs (p95 by linear interpolation; percentages 0–100).

    Computed by aggregations over `manifest` (a lazy frame is scanned in streaming mode, never held whole):
    counts, exact integer sums and the summary_tokens histogram.
    """
    return _metrics(*_aggregate(manifest.lazy()), shards)


def clip_micro() -> pl.Expr:
    """clip_score in millionths, as exact integers (a Float32 of a 6-decimal value is within 1e-7 of it)."""
    return (pl.col("clip_score").cast(pl.Float64) * MICRO).round(0).cast(pl.Int64)


def _aggregate(lazy: pl.LazyFrame) -> tuple[dict[str, Any], list[tuple[int, int]], pl.DataFrame,
                                            list[tuple[int, int]]]:
    """(counts and sums, summary_tokens histogram, pairs per tissue, clip_score histogram) of the pairs of
    `lazy`, streamed.

    The histograms are (tokens, pairs) in tokens order and (clip_score in millionths, pairs), nulls left
    out; a negative token count is an error.
    """
    def count(mask: pl.Expr) -> pl.Expr:
        return mask.cast(pl.Int64).sum()

    stats = lazy.select(
        pairs=pl.len(),
        slides=pl.col("slide_id").n_unique(),
        summary_tokens_nulls=pl.col("summary_tokens").null_count(),
        describe_tokens=pl.col("describe_tokens").cast(pl.Int64).sum(),
        describe_tokens_nulls=pl.col("describe_tokens").null_count(),
        description_words=word_count("description").cast(pl.Int64).sum(),
        summary_words=word_count("summary").cast(pl.Int64).sum(),
        description_truncated=count(pl.col("describe_finish") == "length"),
        revised=count(pl.col("revise_status") == "applied"),
        revise_unchanged=count(pl.col("revise_status") == "unchanged"),
        revise_invalid=count(pl.col("revise_status") == "invalid"),
        revise_unconstrained=count(~pl.col("revise_constrained").fill_null(False)),
        summary_truncated=count(pl.col("summarize_finish") == "length"),
        cut=count(pl.col("summary_cut").fill_null(False)),
        clip_score_nulls=pl.col("clip_score").null_count(),
    )
    tokens = lazy.group_by("summary_tokens").agg(pl.len()).sort("summary_tokens")
    scores = lazy.select(micro=clip_micro()).group_by("micro").agg(pl.len()).sort("micro")
    tissue = (lazy.group_by("tissue").agg(pl.len().alias("pairs"))
              .sort(["pairs", "tissue"], descending=[True, False]))
    # separate queries, not one collect_all: sharing the scan between them caches its text columns
    stats, tokens, tissue, scores = (q.collect(engine="streaming") for q in (stats, tokens, tissue, scores))
    counts = [(int(t), int(c)) for t, c in tokens.iter_rows() if t is not None]
    if counts and counts[0][0] < 0:
        _negative_tokens(lazy)
    score_counts = [(int(m), int(c)) for m, c in scores.iter_rows() if m is not None]
    return stats.row(0, named=True), counts, tissue, score_counts


def _metrics(stats: dict[str, Any], tokens: list[tuple[int, int]], tissue: pl.DataFrame,
             scores: list[tuple[int, int]], shards: list[str]) -> dict[str, Any]:
    n = int(stats["pairs"])

    def pct(name: str) -> float | None:
        return 100.0 * int(stats[name]) / n if n else None

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    nulls = int(stats["summary_tokens_nulls"])
    p95 = percentile_of_counts(tokens, 95)
    score_nulls = int(stats["clip_score_nulls"])

    def score_percentile(q: float) -> float | None:
        """np.percentile over the scores in millionths (exact integers), in score units; NaN with nulls."""
        if score_nulls and n:
            return math.nan
        value = percentile_of_counts(scores, q)
        return None if value is None else value / MICRO

    score_total = sum(m * c for m, c in scores)
    return {
        "pairs": n,
        "slides": int(stats["slides"]),
        "shards": len(shards),
        "summary_tokens_mean": r(_mean_of(sum(t * c for t, c in tokens), nulls, n)),
        "summary_tokens_p95": r(math.nan if nulls and n else p95),
        "summary_words_mean": r(_mean_of(int(stats["summary_words"]), 0, n)),
        "description_words_mean": r(_mean_of(int(stats["description_words"]), 0, n)),
        "description_tokens_mean": r(_mean_of(int(stats["describe_tokens"] or 0), int(stats["describe_tokens_nulls"]),
                                              n)),
        # descriptions cut by describe.max_new_tokens: raise it when this is more than a few percent
        "pct_description_truncated": r(pct("description_truncated")),
        "pct_revised": r(pct("revised")),
        "pct_revise_unchanged": r(pct("revise_unchanged")),
        "pct_revise_invalid": r(pct("revise_invalid")),
        "pct_revise_unconstrained": r(pct("revise_unconstrained")),
        "pct_summary_truncated": r(pct("summary_truncated")),
        "pct_cut": r(pct("cut")),
        # over the dataset's pairs (those below assemble.min_clip_score are not among them)
        "clip_score_mean": r(None if not n else math.nan if score_nulls else score_total / (n * MICRO)),
        "clip_score_p05": r(score_percentile(5)),
        "clip_score_p50": r(score_percentile(50)),
        "clip_score_p95": r(score_percentile(95)),
    }


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _tsv_text(header: list[str], rows: list[list[Any]]) -> str:
    """Tab-separated text; tabs and newlines inside a value become spaces (a reason is one line)."""
    def cell(value: Any) -> str:
        return " ".join(str("" if value is None else value).split())
    return "".join("\t".join(cell(v) for v in row) + "\n" for row in [header, *rows])


CLIP_SCORE_BIN = 20_000  # the clip_scores.csv bins: 0.02 wide (in millionths), from -1 to 1


def clip_score_histogram(counts: list[tuple[int, int]]) -> list[list[Any]]:
    """[bin start, pairs] for the 100 bins [-1.00, -0.98), ..., [0.98, 1.00] (the last includes 1; a score
    outside [-1, 1] counts in the edge bin), from (score in millionths, pairs)."""
    bins = 2 * MICRO // CLIP_SCORE_BIN
    hist = [0] * bins
    for micro, c in counts:
        hist[min(bins - 1, max(0, (micro + MICRO) // CLIP_SCORE_BIN))] += c
    return [[f"{(i * CLIP_SCORE_BIN - MICRO) / MICRO:.2f}", c] for i, c in enumerate(hist)]


def token_histogram(counts: list[tuple[int, int]]) -> list[list[int]]:
    """[tokens, count] for every token count 0..77 (and beyond, up to the largest seen), from (tokens, count)."""
    top = max([CONTEXT_LENGTH, *(t for t, _ in counts)])
    hist = [0] * (top + 1)
    for t, c in counts:
        hist[t] += c
    return [[t, c] for t, c in enumerate(hist)]


FAILURE_COLUMNS = ("shard", "slide_id", "step", "reason")
# The histogram's range: CLIP's text context, pathgen.text.tokens.CONTEXT_LENGTH. Not imported from there:
# that module loads open_clip and torch (~700 MB resident), which assembling never needs.
CONTEXT_LENGTH = 77


class _Part(NamedTuple):
    """A shard's part file, checked: its pairs, and whether its keys are already strictly increasing."""

    shard: str
    path: Path
    rows: int
    ordered: bool


def _scan(path: Path) -> pl.LazyFrame:
    return pl.scan_parquet(path, glob=False, hive_partitioning=False)


def _check_part(shard: str, path: Path) -> _Part:
    """The part's row count and key order, read from its metadata and key column only."""
    try:
        schema = _scan(path).collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise PathgenError(f"shard {shard}: {path} is not a readable parquet file "
                           f"({' '.join(str(exc).split())[:200]}); re-assemble it") from None
    if schema != pl.Schema(PART_SCHEMA):
        raise PathgenError(f"shard {shard}: {path} does not have the assembled part schema; re-assemble it")
    key = pl.col("key")
    rows, nulls, ordered = _scan(path).select(
        rows=pl.len(), nulls=key.null_count(), ordered=(key > key.shift(1)).all(),
    ).collect(engine="streaming").row(0)
    if nulls:
        raise PathgenError(f"shard {shard}: {path} has {nulls} row(s) without a key; re-assemble it")
    return _Part(shard, path, int(rows), bool(ordered))


def _in_key_order(part: _Part, columns: list[str] | None = None) -> pl.LazyFrame:
    """The part's rows sorted by key (as written by assemble_shard they already are: no sort then)."""
    lazy = _scan(part.path)
    lazy = lazy if part.ordered else lazy.sort("key")
    return lazy if columns is None else lazy.select(columns)


def _manifest(parts: list[_Part], columns: list[str] | None = None) -> pl.LazyFrame:
    """Every pair, in shard order then key order, as a lazy concatenation of the part scans."""
    if not parts:
        empty = pl.LazyFrame(schema=PART_SCHEMA)
        return empty if columns is None else empty.select(columns)
    return pl.concat([_in_key_order(p, columns) for p in parts], how="vertical")


def _first_duplicated_key(parts: list[_Part]) -> str | None:
    """The first key, in manifest order, that is there more than once (a streaming group-by over keys only)."""
    repeated = (_manifest(parts, ["key"]).with_row_index("row")
                .group_by("key").agg(pl.len().alias("n"), pl.col("row").min().alias("first"))
                .filter(pl.col("n") > 1).sort("first").head(1).collect(engine="streaming"))
    return repeated["key"][0] if repeated.height else None


def _export_frames(parts: list[_Part]) -> Iterator[pl.DataFrame]:
    """The export's columns, one part at a time, in manifest order."""
    for part in parts:
        yield _in_key_order(part, ["slide_id", "x", "y", "summary", "file_id"]).collect()


def _sink_parquet(lazy: pl.LazyFrame, path: Path) -> None:
    """Stream `lazy` to `path` with the project's parquet settings, atomically (as write_parquet does)."""
    with atomic_path(path) as tmp:
        lazy.sink_parquet(tmp, **PARQUET_SETTINGS, engine="streaming")


def assemble_dataset(out_dir: str | Path, shards: list[str], incomplete: dict[str, str] | None = None) -> dict[str, Any]:
    """The "all" step: from `out_dir/parts`, write manifest, sizes.json, metrics.json, plots, the export
    and failures.tsv.

    Returns the metrics. Every shard must have its tar and part in `out_dir`, except the shards of
    `incomplete` (shard -> why), which are left out and named in failures.tsv and the metrics.

    Streams: the parts are scanned lazily (metrics and plots by aggregations, the manifest by a parquet
    sink, the export part by part), so memory does not grow with the dataset's texts. Every check
    (files, schema, keys) is done before the first file is written.
    """
    out_dir = Path(out_dir)
    incomplete = dict(sorted((incomplete or {}).items()))
    unknown = sorted(set(incomplete) - set(shards))
    if unknown:
        raise PathgenError(f"incomplete shard {unknown[0]} is not one of the dataset's shards")
    parts: list[_Part] = []
    sizes: dict[str, int] = {}
    slide_records: list[dict[str, Any]] = []
    thresholds: dict[float | None, str] = {}  # assemble.min_clip_score -> the first shard assembled with it
    for shard in shards:
        if shard in incomplete:
            continue
        part_path, tar_path = out_dir / "parts" / f"{shard}.parquet", out_dir / f"{shard}.tar"
        for path in (part_path, tar_path):
            if not path.is_file():
                raise PathgenError(f"shard {shard}: {path} not found; assemble the shard first")
        part = _check_part(shard, part_path)
        parts.append(part)
        sizes[tar_path.name] = part.rows
        slides_path = out_dir / "parts" / f"{shard}.slides.json"
        if slides_path.is_file():
            records = json.loads(slides_path.read_text(encoding="utf-8"))
            for rec in records:
                if not {"pairs_below_min_clip_score", "min_clip_score", "qc_excluded"} <= set(rec):
                    raise PathgenError(f"shard {shard}: {slides_path} has no clip score filter or quality "
                                       "control counts (assembled before them); re-assemble it")
                thresholds.setdefault(rec["min_clip_score"], shard)
            slide_records.extend(records)
    if len(thresholds) > 1:
        (a, first), (b, second) = list(thresholds.items())[:2]
        raise PathgenError(f"shard {first} was assembled with assemble.min_clip_score {a} but shard {second} with "
                           f"{b}; re-assemble the shards with one params.yaml")
    min_clip_score = next(iter(thresholds), None)
    duplicated = _first_duplicated_key(parts)
    if duplicated is not None:
        raise PathgenError(f"key '{duplicated}' is in more than one shard")

    stats, tokens, tissue, scores = _aggregate(_manifest(parts))
    metrics = _metrics(stats, tokens, tissue, scores, shards)
    quarantined = [r for r in slide_records if r["status"] == QUARANTINED]
    metrics.update({
        "complete": not incomplete,
        "incomplete_shards": list(incomplete),
        "slides_in_shards": len(slide_records),
        "slides_quarantined": len(quarantined),
        "slides_without_pairs": sum(1 for r in slide_records if r["status"] != QUARANTINED and r["pairs"] == 0),
        "min_clip_score": min_clip_score,
        "pairs_below_min_clip_score": sum(int(r["pairs_below_min_clip_score"]) for r in slide_records),
        **qc_metrics(slide_records),
    })
    failures = [[r["shard"], r["slide_id"], r["step"], r["reason"]] for r in quarantined]
    failures += [[shard, "", "shard", why] for shard, why in incomplete.items()]
    plot_rows = {"caption_tokens.csv": token_histogram(tokens),
                 "pairs_per_tissue.csv": [list(r) for r in tissue.iter_rows()],
                 "clip_scores.csv": clip_score_histogram(scores)}
    for name, columns in PLOTS.items():
        write_text(_csv_text(list(columns), plot_rows[name]), out_dir / "plots" / name)
    write_text(_tsv_text(list(FAILURE_COLUMNS), sorted(failures)), out_dir / FAILURES_NAME)
    write_pathgen_json(pathgen_records(_export_frames(parts)), out_dir / EXPORT_NAME)
    write_json(sizes, out_dir / "sizes.json")
    _sink_parquet(_manifest(parts), out_dir / "manifest.parquet")
    write_json(metrics, out_dir / METRICS_NAME)
    return metrics
