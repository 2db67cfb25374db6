"""assemble: join a shard's patches and captions into a WebDataset shard, then the whole dataset.

Per shard (`assemble_shard`), for every kept patch of the shard's slides:

- `{key}.jpg`: the patch bytes, copied unchanged from `data/patches/{slide}.tar`;
- `{key}.txt`: the summary (the caption CLIP trains on), UTF-8, as written;
- `{key}.json`: provenance (selection, description, revision, summary, fingerprints).

Members are in key order (`{slide_id}/x{X:07d}_y{Y:07d}`), each pair's three
members together, so WebDataset groups them into one sample whose `__key__`
is the key. The same rows go to `parts/{shard}.parquet`.

The shard's slides and how their jobs ended (ok or quarantined, with the
step and reason; pathgen.store.status) go to `parts/{shard}.slides.json`.

For the dataset (`assemble_dataset`): `manifest.parquet`, `sizes.json` (read by
open_clip's trainer), `metrics.json`, plot data under `plots/`, an export in
the released PathGen-1.6M JSON format (`pathgen-1.6m.json`), and
`failures.tsv`: every quarantined slide, and every shard left out because its
jobs did not complete (`incomplete`: the run's failed jobs, passed by the
workflow's onerror handler, so that a failed run still leaves the dataset of
what succeeded, never the previous build's).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pathgen.errors import PathgenError
from pathgen.interop.pathgen_json import pathgen_records, write_pathgen_json
from pathgen.store.dataset import EXPORT_NAME, FAILURES_NAME, METRICS_NAME, PLOTS
from pathgen.store.io import atomic_path, tar_member, write_json, write_parquet, write_text
from pathgen.store.manifest import SlideEntry
from pathgen.store.patch_tars import member_name
from pathgen.store.shards import pair_key
from pathgen.store.status import QUARANTINED, read_status
from pathgen.store.tables import require_columns, require_unique
from pathgen.text.tokens import CONTEXT_LENGTH

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


def shard_inputs(shard: str, slide_ids: list[str], data_dir: str | Path) -> dict[str, list[Path]]:
    """The input files of `assemble_shard`, by kind (patches, selection, tiles, captions, revised, summaries)."""
    data_dir = Path(data_dir)
    return {
        "patches": [data_dir / "patches" / f"{s}.tar" for s in slide_ids],
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


def assemble_shard(shard: str, slides: list[SlideEntry], data_dir: str | Path, out_dir: str | Path) -> pl.DataFrame:
    """Write `out_dir/{shard}.tar` (WebDataset) and `out_dir/parts/{shard}.parquet`; return the part rows.

    A missing input file, a captioned key without a kept selection row, a
    revised/summary row or a tar member, or a kept patch without captions
    raises PathgenError naming the shard, slide and key.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rows = _pair_rows(shard, slides, data_dir)
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
    write_json(shard_slide_records(shard, slides, data_dir, part), out_dir / "parts" / f"{shard}.slides.json")
    write_parquet(part, out_dir / "parts" / f"{shard}.parquet")
    return part


def shard_slide_records(shard: str, slides: list[SlideEntry], data_dir: Path, part: pl.DataFrame) -> list[dict]:
    """Each slide of the shard with its pair count and its select job's status (ok when it has none)."""
    pairs = dict(part.group_by("slide_id").agg(pl.len()).iter_rows()) if part.height else {}
    out = []
    for entry in slides:
        path = data_dir / "patches" / f"{entry.slide_id}.status.json"
        rec = read_status(path) if path.is_file() else {"status": "ok", "step": None, "reason": None}
        out.append({"slide_id": entry.slide_id, "shard": shard, "status": rec["status"], "step": rec["step"],
                    "reason": rec["reason"], "pairs": int(pairs.get(entry.slide_id, 0))})
    return out


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def dataset_metrics(manifest: pl.DataFrame, shards: list[str]) -> dict[str, Any]:
    """Summary statistics of the assembled pairs (p95 by linear interpolation; percentages 0–100)."""
    n = manifest.height
    tokens = manifest["summary_tokens"].cast(pl.Float64).to_numpy()
    words = np.array([len((d or "").split()) for d in manifest["description"]], np.float64)
    summary_words = np.array([len((s or "").split()) for s in manifest["summary"]], np.float64)

    def pct(mask: pl.Series) -> float | None:
        return 100.0 * int(mask.sum()) / n if n else None

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    return {
        "pairs": n,
        "slides": manifest["slide_id"].n_unique(),
        "shards": len(shards),
        "summary_tokens_mean": r(_mean(tokens)),
        "summary_tokens_p95": r(_percentile(tokens, 95)),
        "summary_words_mean": r(_mean(summary_words)),
        "description_words_mean": r(_mean(words)),
        "description_tokens_mean": r(_mean(manifest["describe_tokens"].cast(pl.Float64).to_numpy())),
        # descriptions cut by describe.max_new_tokens: raise it when this is more than a few percent
        "pct_description_truncated": r(pct(manifest["describe_finish"] == "length")),
        "pct_revised": r(pct(manifest["revise_status"] == "applied")),
        "pct_revise_unchanged": r(pct(manifest["revise_status"] == "unchanged")),
        "pct_revise_invalid": r(pct(manifest["revise_status"] == "invalid")),
        "pct_revise_unconstrained": r(pct(~manifest["revise_constrained"].fill_null(False))),
        "pct_summary_truncated": r(pct(manifest["summarize_finish"] == "length")),
        "pct_cut": r(pct(manifest["summary_cut"].fill_null(False))),
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


def token_histogram(tokens: list[int]) -> list[list[int]]:
    """[tokens, count] for every token count 0..77 (and beyond, up to the largest seen)."""
    top = max([CONTEXT_LENGTH, *tokens]) if tokens else CONTEXT_LENGTH
    counts = np.bincount(np.asarray(tokens, np.int64), minlength=top + 1) if tokens else np.zeros(top + 1, np.int64)
    return [[t, int(c)] for t, c in enumerate(counts)]


FAILURE_COLUMNS = ("shard", "slide_id", "step", "reason")


def assemble_dataset(out_dir: str | Path, shards: list[str], incomplete: dict[str, str] | None = None) -> dict[str, Any]:
    """The "all" step: from `out_dir/parts`, write manifest, sizes.json, metrics.json, plots, the export
    and failures.tsv.

    Returns the metrics. Every shard must have its tar and part in `out_dir`, except the shards of
    `incomplete` (shard -> why), which are left out and named in failures.tsv and the metrics.
    """
    out_dir = Path(out_dir)
    incomplete = dict(sorted((incomplete or {}).items()))
    unknown = sorted(set(incomplete) - set(shards))
    if unknown:
        raise PathgenError(f"incomplete shard {unknown[0]} is not one of the dataset's shards")
    parts: list[pl.DataFrame] = []
    sizes: dict[str, int] = {}
    slide_records: list[dict[str, Any]] = []
    for shard in shards:
        if shard in incomplete:
            continue
        part_path, tar_path = out_dir / "parts" / f"{shard}.parquet", out_dir / f"{shard}.tar"
        for path in (part_path, tar_path):
            if not path.is_file():
                raise PathgenError(f"shard {shard}: {path} not found; assemble the shard first")
        part = pl.read_parquet(part_path).sort("key")
        if part.schema != pl.Schema(PART_SCHEMA):
            raise PathgenError(f"shard {shard}: {part_path} does not have the assembled part schema; re-assemble it")
        parts.append(part)
        sizes[tar_path.name] = part.height
        slides_path = out_dir / "parts" / f"{shard}.slides.json"
        if slides_path.is_file():
            slide_records.extend(json.loads(slides_path.read_text(encoding="utf-8")))
    manifest = pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema=PART_SCHEMA)
    duplicated = manifest.filter(pl.col("key").is_duplicated())["key"]
    if len(duplicated):
        raise PathgenError(f"key '{duplicated[0]}' is in more than one shard")

    metrics = dataset_metrics(manifest, shards)
    quarantined = [r for r in slide_records if r["status"] == QUARANTINED]
    metrics.update({
        "complete": not incomplete,
        "incomplete_shards": list(incomplete),
        "slides_in_shards": len(slide_records),
        "slides_quarantined": len(quarantined),
        "slides_without_pairs": sum(1 for r in slide_records if r["status"] != QUARANTINED and r["pairs"] == 0),
    })
    failures = [[r["shard"], r["slide_id"], r["step"], r["reason"]] for r in quarantined]
    failures += [[shard, "", "shard", why] for shard, why in incomplete.items()]
    tissue = (manifest.group_by("tissue").agg(pl.len().alias("pairs"))
              .sort(["pairs", "tissue"], descending=[True, False]))
    plot_rows = {"caption_tokens.csv": token_histogram([int(t) for t in manifest["summary_tokens"].drop_nulls()]),
                 "pairs_per_tissue.csv": [list(r) for r in tissue.iter_rows()]}
    for name, columns in PLOTS.items():
        write_text(_csv_text(list(columns), plot_rows[name]), out_dir / "plots" / name)
    write_text(_tsv_text(list(FAILURE_COLUMNS), sorted(failures)), out_dir / FAILURES_NAME)
    write_pathgen_json(pathgen_records(manifest), out_dir / EXPORT_NAME)
    write_json(sizes, out_dir / "sizes.json")
    write_parquet(manifest, out_dir / "manifest.parquet")
    write_json(metrics, out_dir / METRICS_NAME)
    return metrics
