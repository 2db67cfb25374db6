"""Memory and time of `assemble_dataset` (the "all" step) at PathGen-1.6M scale, old vs new.

    python bench/assemble.py [--shards 800] [--pairs-per-shard 2000] [--old-ref REV] [--skip-old] [--keep DIR]

Writes synthetic shard parts (`parts/{shard}.parquet` in the assembled part
schema, an empty `{shard}.tar` and `parts/{shard}.slides.json` per shard;
deterministic: the same arguments give the same bytes) into a temporary
directory, then runs `assemble_dataset` on them in a fresh process per
implementation and prints its seconds and peak RSS (VmHWM of that process):

  new   pathgen.steps.assemble of this working tree
  old   the same module (and pathgen.interop.pathgen_json) as of --old-ref, the
        implementation that concatenated every part in memory

with the ratios old / new, and whether the two wrote the same bytes. Texts
have realistic lengths: descriptions and revisions of 100-300 words, summaries
of 30-60 words, every text distinct. The target at 800 x 2,000 = 1.6M pairs is
a peak RSS <= 3 GB for the new implementation. The old one needs several times
that: with --skip-old only the new one runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import tempfile
import time

import numpy as np
import polars as pl

from pathgen.steps.assemble import PART_SCHEMA  # noqa: E402
from pathgen.store.io import sha256_file  # noqa: E402

SLIDES_PER_SHARD = 8
TISSUES = ("breast", "lung", "colon", "kidney", "prostate", "skin", "liver", "brain")
POOL = 509  # distinct text bodies; every row prefixes its key, so no two texts are equal
OLD_REF = "30f04047e8b960d425d46a19af3083f5754426f6"  # the last commit with the in-memory assemble_dataset


def _vocabulary(rng: np.random.Generator, size: int = 3000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 12, size)
    return ["".join(rng.choice(letters, n)) for n in lengths]


def _texts(rng: np.random.Generator, vocab: list[str], low: int, high: int) -> list[str]:
    words = np.array(vocab)
    return [" ".join(rng.choice(words, int(n))) + "." for n in rng.integers(low, high + 1, POOL)]


def write_parts(out_dir: Path, shards: int, pairs_per_shard: int, seed: int = 0) -> list[str]:
    """Write synthetic parts for `shards` shards of `pairs_per_shard` pairs each; return the shard names."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    pools = {"description": _texts(rng, vocab, 100, 300), "revised": _texts(rng, vocab, 100, 300),
             "summary": _texts(rng, vocab, 30, 60)}
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    per_slide = -(-pairs_per_shard // SLIDES_PER_SHARD)
    names = []
    for s in range(shards):
        shard = f"{s:05d}"
        names.append(shard)
        i = np.arange(pairs_per_shard)
        slide = i // per_slide
        x, y = (i % per_slide) % 64 * 672, (i % per_slide) // 64 * 672
        row = s * pairs_per_shard + i
        frame = pl.DataFrame({
            "slide": slide, "x": x, "y": y, "row": row,
        }).with_columns(
            slide_id=pl.format("TCGA-{}-{}.DX1", pl.lit(shard), pl.col("slide").cast(pl.String).str.zfill(2)),
        ).with_columns(
            key=pl.format("{}/x{}_y{}", pl.col("slide_id"), pl.col("x").cast(pl.String).str.zfill(7),
                          pl.col("y").cast(pl.String).str.zfill(7)),
        )
        texts = {name: pl.Series(pool)[((row * (k + 7919)) % POOL).tolist()]
                 for k, (name, pool) in enumerate(pools.items())}
        tokens = (row * 2654435761 % 78).astype(np.int32)
        part = frame.with_columns(
            shard=pl.lit(shard),
            tissue=pl.Series([TISSUES[(s + int(v)) % len(TISSUES)] for v in slide]),
            project=pl.lit("TCGA-SYN"),
            file_id=pl.format("file-{}", pl.col("slide_id")),
            level=pl.lit(0, pl.Int32), size=pl.lit(672, pl.Int32), mpp=pl.lit(0.2527),
            reasons=pl.lit("report+cluster"),
            report_score=pl.Series((row % 1000 / 1000).astype(np.float32)),
            attribute_score=pl.lit(None, pl.Float32),
            cluster=pl.Series((row % 11).astype(np.int32)),
            description=pl.format("{} {}", pl.col("key"), pl.lit(texts["description"])),
            ops=pl.concat_str(pl.lit('[{"new": "'), pl.col("key"), pl.lit('", "old": "a", "op": "edit"}]')),
            revised=pl.format("{} {}", pl.col("key"), pl.lit(texts["revised"])),
            revise_status=pl.Series(np.array(["applied", "unchanged", "invalid"])[row % 3]),
            summary=pl.format("{} {}", pl.col("key"), pl.lit(texts["summary"])),
            summary_tokens=pl.Series(tokens),
            summary_cut=pl.Series(row % 17 == 0),
            describe_engine=pl.lit("vllm"), describe_finish=pl.Series(np.where(row % 23 == 0, "length", "stop")),
            describe_tokens=pl.Series((200 + row % 300).astype(np.int32)),
            revise_engine=pl.lit("vllm"), revise_constrained=pl.Series(row % 29 != 0), revise_finish=pl.lit("stop"),
            summarize_engine=pl.lit("llama_cpp"), summarize_finish=pl.lit("stop"),
            describe_fingerprint=pl.lit("d" * 16), revise_fingerprint=pl.lit("r" * 16),
            summarize_fingerprint=pl.lit("s" * 16),
            image_sha256=pl.col("key").map_elements(lambda k: hashlib.sha256(k.encode()).hexdigest(),
                                                    return_dtype=pl.String),
        ).select(list(PART_SCHEMA)).cast(PART_SCHEMA).sort("key")
        part.write_parquet(out_dir / "parts" / f"{shard}.parquet", compression="zstd", compression_level=3,
                           statistics=True, row_group_size=65536)
        (out_dir / f"{shard}.tar").write_bytes(b"")
        slides = part.group_by("slide_id", maintain_order=True).len()
        (out_dir / "parts" / f"{shard}.slides.json").write_text(json.dumps([
            {"slide_id": sid, "shard": shard, "status": "ok", "step": None, "reason": None, "pairs": n}
            for sid, n in slides.iter_rows()]))
    return names


CHILD = """
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
# the venv's editable install of pathgen would win over sys.path: import the given tree's copy
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import pathgen.steps.assemble
assert pathgen.steps.assemble.__file__.startswith(sys.argv[1]), pathgen.steps.assemble.__file__
from pathgen.steps.assemble import assemble_dataset
shards = json.loads(open(sys.argv[3]).read())
start = time.perf_counter()
assemble_dataset(sys.argv[2], shards)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would report the parent's, were it larger: vfork + exec)
peak_kb = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024}))
"""


def old_tree(ref: str, dest: Path) -> Path:
    """A copy of this tree's pathgen package with assemble and its export writer as of `ref`."""
    shutil.copytree(ROOT / "pathgen", dest / "pathgen", ignore=shutil.ignore_patterns("__pycache__"))
    for path in ("pathgen/steps/assemble.py", "pathgen/interop/pathgen_json.py"):
        text = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
        (dest / path).write_bytes(text)
    return dest


def run(tree: Path, data: Path, shards_file: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(data), str(shards_file)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def outputs(data: Path) -> dict[str, str]:
    """sha256 of every file assemble_dataset wrote."""
    return {str(p.relative_to(data)): sha256_file(p) for p in sorted(data.rglob("*"))
            if p.is_file() and "parts" not in p.parts and p.suffix != ".tar" and p.name != "shards.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=800)
    parser.add_argument("--pairs-per-shard", type=int, default=2000)
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the old implementation")
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--keep", type=Path, help="write the parts here (reused when present) instead of a temp dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-assemble-") as tmp:
        tmp = Path(tmp)
        data = args.keep or tmp / "data"
        t0 = time.perf_counter()
        if (data / "shards.json").is_file():
            shards = json.loads((data / "shards.json").read_text())
        else:
            shards = write_parts(data, args.shards, args.pairs_per_shard)
            (data / "shards.json").write_text(json.dumps(shards))
        parts_bytes = sum(p.stat().st_size for p in (data / "parts").glob("*.parquet"))
        print(f"parts: {len(shards)} shards x {args.pairs_per_shard} pairs = {len(shards) * args.pairs_per_shard:,} "
              f"pairs, {parts_bytes / 2**20:.0f} MiB of parquet ({time.perf_counter() - t0:.0f} s to write)")
        results = {}
        impls = [("new", ROOT)] if args.skip_old else [("new", ROOT), ("old", old_tree(args.old_ref, tmp / "old"))]
        for name, tree in impls:
            results[name] = run(tree, data, data / "shards.json")
            results[name]["outputs"] = outputs(data)
            print(f"{name:>4}: {results[name]['seconds']:8.1f} s  peak RSS {results[name]['peak_rss_mb']:8.0f} MB")
        if "old" in results:
            new, old = results["new"], results["old"]
            print(f"old/new: time x{old['seconds'] / new['seconds']:.2f}, "
                  f"peak RSS x{old['peak_rss_mb'] / new['peak_rss_mb']:.2f}")
            differ = sorted(k for k in {**new["outputs"], **old["outputs"]}
                            if new["outputs"].get(k) != old["outputs"].get(k))
            print(f"outputs byte-identical: {not differ}" + (f" (differ: {differ})" if differ else ""))
        print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
