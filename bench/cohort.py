"""What a cohort costs: each step's per-item rate measured on this machine, times a cohort description.

    python bench/cohort.py [--slides 7500] [--tissue-patches 20000] [--kept-patches 220]
                           [--clip-arch ViT-L-14-336] [--measure-models] [--rate caption=2.5 ...]

Run from the project root after `make demo`. Per step it prints the items a cohort has, the rate
(items/s of one job), the resource the step runs on as params.yaml configures it (GPU if its model
is on a GPU here, else CPU), and the hours on that resource: GPU-hours, or CPU-hours (wall hours x
the job's threads). Model loading is counted once per job (embed: per slide; model steps: per shard).

Where the rates come from:
  tile      `tile_slide` on the demo slides, per grid cell (level-0 area / patch area), so it scales
            with slide size; a cohort slide has --grid-cells cells (default 2.5 x tissue patches)
  embed     the step's own reader (one process, one thread) and the CLIP forward on this machine's
            device, measured apart; the step's rate is min(readers x read rate, forward rate), as
            bench/embed.py shows the step reaches. --clip-arch builds that open_clip architecture with
            random weights (no download) for the forward pass and the load time, e.g. ViT-L-14-336,
            PathGen-CLIP-L's
  select    `select_patches` on synthetic features of --tissue-patches patches (the real size: k-means
            cost grows as N^1.5), the configured CLIP's width (or --clip-arch's)
  patches   cutting and JPEG-encoding kept patches from the demo slides
  caption, revise, summarize
            the last build's logs/{step}/*.stats.json where they computed items (misses per
            generate-second, load seconds per job); --measure-models runs each step on
            --model-items demo patches with an empty cache instead; --rate STEP=ITEMS_PER_S
            overrides (e.g. a vLLM rate measured on a GPU node with bench/engines.py)
  assemble  `assemble_shard` of the demo's first shard, per pair (with the caption CLIP scores, empty cache)

The demo's models are tiny: their caption/revise/summarize rates say nothing about 13B LLaVAs, and
the output says which rates are whose. Nothing here writes under data/ or logs/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathgen.config import load_params, step_params  # noqa: E402
from pathgen.models.gpus import STEP_MODEL, gpu_request  # noqa: E402
from pathgen.reporting.throughput import MODEL_STEPS  # noqa: E402
from pathgen.store.manifest import read_manifest  # noqa: E402
from pathgen.store.shards import shard_slides  # noqa: E402



def measure_tile(slides, params) -> tuple[float, float]:
    """(grid cells per second, seconds per slide) of tile_slide on the demo slides."""
    from pathgen.steps.tile import tile_slide
    from pathgen.wsi.slide import Slide

    cells, seconds = 0, 0.0
    for entry in slides:
        with Slide(entry.path, entry.slide_id, entry.mpp) as slide:
            start = time.perf_counter()
            _, _, info = tile_slide(slide, params["tile"])
            seconds += time.perf_counter() - start
        cells += info["grid_cells"]
    return cells / seconds, seconds / len(slides)


def embed_rates(slides, params, arch: str | None, limit: int, batches: int) -> dict:
    """The embed step's parts on this machine: its reader (one process, one thread), the forward pass at
    embed.precision on the configured device, and the model's load time (bench/embed.py's measurements)."""
    from embed import bench_forward, bench_new_read, random_clip

    from pathgen.models.clip import load_clip
    from pathgen.steps.embed import ModelInput, resolve_precision

    start = time.perf_counter()
    clip = load_clip(params["clip"], params["embed"]["device"])
    if arch:
        clip = random_clip(clip, arch)
    load_s = time.perf_counter() - start
    precision = resolve_precision(params["embed"]["precision"], clip.device)
    model_input = ModelInput(clip.preprocess, clip.input_size)
    grids = {s.slide_id: pl.read_parquet(f"data/tiles/{s.slide_id}.parquet") for s in slides}
    n, seconds = bench_new_read(slides, grids, model_input, params["embed"]["reader"], clip.device.type == "cpu", limit)
    batch = params["embed"]["batch_size"]
    done, forward_s = bench_forward(clip, model_input, batch * batches, batch, precision)
    return {"name": clip.name, "device": clip.device.type, "precision": precision, "load_s": load_s,
            "read": n / seconds, "forward": done / forward_s, "batch": batch, "dim": clip.model.visual.output_dim}


def measure_select(params, n: int, dim: int) -> float:
    """Seconds of select_patches on one synthetic slide of n patches (features as embed stores them)."""
    from pathgen.steps.select import select_patches

    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features = features.astype(np.float16).astype(np.float32)
    text = rng.standard_normal((40, dim), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    coords = np.stack([np.arange(n) * 672, np.zeros(n, np.int64)], axis=1)
    geometry = {"size": 672, "level": 0, "read_size": 672, "out_size": 672}
    start = time.perf_counter()
    select_patches(features, coords, text[:20], text[20:], params["select"], params["seed"], "synthetic", geometry)
    return time.perf_counter() - start


def measure_patches(slides, params, limit: int) -> float:
    """Kept patches/s of the patches step (read at full resolution + JPEG encode)."""
    from pathgen.steps.patches import extract_patches
    from pathgen.wsi.slide import Slide

    count, start = 0, time.perf_counter()
    for entry in slides:
        selection = pl.read_parquet(f"data/selection/{entry.slide_id}.parquet").filter(pl.col("kept")).head(limit)
        with Slide(entry.path, entry.slide_id, entry.mpp) as slide:
            count += len(extract_patches(slide, selection, params["patches"]["jpeg_quality"]))
    return count / (time.perf_counter() - start)


def measure_assemble(slides, params) -> float:
    """Pairs/s of assemble_shard on the demo's first shard, into a temporary directory."""
    from pathgen.steps.assemble import assemble_shard

    shard, ids = next(iter(shard_slides([s.slide_id for s in slides], params["shards"]["slides_per_shard"]).items()))
    entries = [s for s in slides if s.slide_id in ids]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()  # an empty cache: the summaries' CLIP text features are computed
        part = assemble_shard(shard, entries, Path("data"), Path(tmp) / "out", step_params(params, "assemble"),
                              cache_dir=Path(tmp) / "cache")
        return part.height / (time.perf_counter() - start)


def logged_model_rates(log_root: Path) -> dict[str, dict[str, float]]:
    """Per model step, from the stats of jobs that computed every item (no cache hits): items per
    generate-second, and load seconds per job that loaded its model."""
    out = {}
    for step in MODEL_STEPS:
        items = compute = loads = loaded = 0.0
        for path in sorted((log_root / step).glob("*.stats.json")):
            stats = json.loads(path.read_text())
            if stats.get("items") and not stats.get("hits") and stats.get("generate_seconds"):
                items += stats["items"]
                compute += stats["generate_seconds"]
            if stats.get("loaded"):
                loads += stats.get("load_seconds") or 0.0
                loaded += 1
        if items and compute:
            out[step] = {"rate": items / compute, "load_s": loads / loaded if loaded else 0.0,
                         "source": f"{log_root}/{step}/*.stats.json ({int(items)} items computed)"}
    return out


def measured_model_rates(slides, params, items: int, threads: int) -> dict[str, dict[str, float]]:
    """Each model step run on `items` patches of the first demo shard with an empty cache."""
    from pathgen.steps.caption import run_caption
    from pathgen.steps.revise import run_revise
    from pathgen.steps.summarize import run_summarize
    from pathgen.store.io import write_tar
    from pathgen.store.shards import pair_key

    shard, ids = next(iter(shard_slides([s.slide_id for s in slides], params["shards"]["slides_per_shard"]).items()))
    entry = next(s for s in slides if s.slide_id == ids[0])
    slides_json = [{"slide_id": entry.slide_id, "tissue": entry.tissue, "project": entry.project}]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tarfile.open(f"data/patches/{entry.slide_id}.tar") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)[:items]
            write_tar({m.name: tar.extractfile(m).read() for m in members}, tmp / "patches" / f"{entry.slide_id}.tar")
        patches = [str(tmp / "patches" / f"{entry.slide_id}.tar")]
        keys = {pair_key(entry.slide_id, *(int(v[1:]) for v in Path(m.name).stem.split("_"))) for m in members}
        for name in ("captions", "revised"):
            pl.read_parquet(f"data/{name}/{shard}.parquet").filter(pl.col("key").is_in(sorted(keys))).write_parquet(
                tmp / f"{name}.parquet")
        runs = {
            "caption": lambda: run_caption(patches, slides_json, params["describe"], tmp / "cache", 32,
                                           tmp / "out-caption.parquet", threads=threads, log_dir=tmp),
            "revise": lambda: run_revise(patches, slides_json, tmp / "captions.parquet", params["revise"], tmp / "cache",
                                         32, tmp / "out-revise.parquet", threads=threads, log_dir=tmp),
            "summarize": lambda: run_summarize(tmp / "revised.parquet", params["summarize"], tmp / "cache", 32,
                                               tmp / "out-summarize.parquet", threads=threads, log_dir=tmp),
        }
        for step, run in runs.items():
            stats = run()
            out[step] = {"rate": stats["items"] / stats["generate_seconds"], "load_s": stats["load_seconds"],
                         "source": f"measured now on {stats['items']} demo items, empty cache"}
    return out


def hours(items: float, rate: float, jobs: int, load_s: float) -> float:
    return (items / rate + jobs * load_s) / 3600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--slides", type=int, default=7500)
    parser.add_argument("--tissue-patches", type=int, default=20000, help="mean tissue patches per slide")
    parser.add_argument("--kept-patches", type=int, default=220, help="mean kept (captioned) patches per slide")
    parser.add_argument("--grid-cells", type=int, help="mean grid cells per slide (default 2.5 x tissue patches)")
    parser.add_argument("--slides-per-shard", type=int, default=20, help="the cohort's shards.slides_per_shard")
    parser.add_argument("--clip-arch", help="open_clip architecture with random weights for embed (e.g. ViT-L-14-336)")
    parser.add_argument("--readers", type=int, default=7,
                        help="embed reader processes per job, one core each (profiles/slurm: 7)")
    parser.add_argument("--forward-batches", type=int, default=3)
    parser.add_argument("--limit", type=int, default=64, help="patches per demo slide for the read/patch rates")
    parser.add_argument("--measure-models", action="store_true")
    parser.add_argument("--model-items", type=int, default=24)
    parser.add_argument("--rate", action="append", default=[], metavar="STEP=ITEMS_PER_S")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    params = load_params(args.params)
    torch.set_num_threads(args.threads)
    slides = read_manifest(params["manifest"])
    grid_cells = args.grid_cells or int(2.5 * args.tissue_patches)
    n_slides, tissue, kept = args.slides, args.slides * args.tissue_patches, args.slides * args.kept_patches
    shards = math.ceil(args.slides / args.slides_per_shard)
    on_gpu = {step: bool(gpu_request(params, step)) and torch.cuda.is_available()
              for step in ("embed", "caption", "revise", "summarize")}

    rows = []  # step, items, unit, rate, jobs, load_s, resource, threads, source

    cells_per_s, _ = measure_tile(slides, params)
    rows.append(("tile", n_slides, "slides", cells_per_s / grid_cells, n_slides, 0.0, "CPU", 1,
                 f"{cells_per_s:.0f} grid cells/s on the demo slides, {grid_cells} cells per slide"))

    e = embed_rates(slides, params, args.clip_arch, args.limit, args.forward_batches)
    embed_rate = min(args.readers * e["read"], e["forward"])
    embed_resource = "GPU" if e["device"] == "cuda" else "CPU"
    # On a GPU the readers are the GPU job's cores; on CPU the job's cores are its threads plus its readers.
    rows.append(("embed", tissue, "tissue patches", embed_rate, n_slides, e["load_s"], embed_resource,
                 1 if embed_resource == "GPU" else args.threads + args.readers,
                 f"{e['name']} on {e['device']} ({e['precision']}): forward {e['forward']:.2f}/s (batch {e['batch']}), "
                 f"read {e['read']:.0f}/s per core x {args.readers} readers, load {e['load_s']:.1f} s per slide"))
    dim = e["dim"]

    select_s = measure_select(params, args.tissue_patches, dim)
    rows.append(("select", n_slides, "slides", 1.0 / select_s, n_slides, 0.0, "CPU", 1,
                 f"select_patches on {args.tissue_patches} synthetic {dim}-d features: {select_s:.1f} s"))
    rows.append(("patches", kept, "kept patches", measure_patches(slides, params, args.limit), n_slides, 0.0, "CPU",
                 1, "read 672 px + JPEG encode, demo slides"))

    model_rates = logged_model_rates(Path("logs"))
    if args.measure_models:
        model_rates = measured_model_rates(slides, params, args.model_items, args.threads)
    for spec in args.rate:
        step, _, value = spec.partition("=")
        model_rates[step] = {"rate": float(value), "load_s": model_rates.get(step, {}).get("load_s", 0.0),
                             "source": "--rate"}
    for step in MODEL_STEPS:
        agent = STEP_MODEL[step]
        resource = "GPU" if on_gpu[step] else "CPU"
        if step not in model_rates:
            rows.append((step, kept, "kept patches", None, shards, 0.0, resource, args.threads,
                         "no rate: the logs hold no computed items (run with --measure-models or --rate)"))
            continue
        r = model_rates[step]
        rows.append((step, kept, "kept patches", r["rate"], shards, r["load_s"], resource,
                     1 if resource == "GPU" else args.threads,
                     f"{params[agent]['checkpoint']} ({params[agent]['engine']}): {r['source']}"))
    rows.append(("assemble", kept, "pairs", measure_assemble(slides, params), shards, 0.0, "CPU", 1,
                 "assemble_shard of the demo's first shard"))

    print(f"cohort: {n_slides} slides, {args.tissue_patches} tissue patches and {args.kept_patches} kept patches "
          f"per slide ({tissue:,} embedded, {kept:,} pairs), {shards} shards of {args.slides_per_shard} slides; "
          f"this machine: {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    print(f"{'step':<10} {'items':>13} {'unit':<15} {'items/s':>10} {'hours':>11}  resource  source")
    totals = {"GPU": 0.0, "CPU": 0.0}
    for step, items, unit, rate, jobs, load, resource, threads, source in rows:
        if rate is None:
            print(f"{step:<10} {items:>13,} {unit:<15} {'?':>10} {'?':>11}  {resource}-h     {source}")
            continue
        h = hours(items, rate, jobs, load) * threads
        totals[resource] += h
        print(f"{step:<10} {items:>13,} {unit:<15} {rate:>10.3f} {h:>11,.1f}  {resource}-h     {source}")
    print(f"total: {totals['GPU']:,.1f} GPU-hours, {totals['CPU']:,.1f} CPU-hours"
          + ("" if all(r[3] is not None for r in rows) else " (steps without a rate left out)"))


if __name__ == "__main__":
    main()
