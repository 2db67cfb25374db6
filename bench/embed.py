"""Embed throughput on the demo slides: bare reading, bare model forward, the end-to-end step.

    python bench/embed.py [--params params.yaml] [--limit N] [--workers N] [--batch-size N]

Prints patches/s for
  read     OpenSlide read_region (672 px) + the model's preprocess (resize to 336), one process, one thread
  forward  encode_image on preprocessed batches already in memory
  e2e      the embed step as the pipeline runs it (DataLoader workers, forward, Zarr write)
and the ratio e2e / min(read, forward): 1.0 means the step is as fast as its slowest part
alone; above 1, reading overlaps with the forward pass.
Run from the project root after `make demo` (needs data/tiles/ and the models).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathgen.config import load_params  # noqa: E402
from pathgen.models.clip import encode_images, load_clip  # noqa: E402
from pathgen.steps.embed import run_embed  # noqa: E402
from pathgen.store.manifest import read_manifest  # noqa: E402
from pathgen.wsi.slide import Slide  # noqa: E402


def bench_read(slides, grids, preprocess, limit) -> tuple[int, float]:
    # One torch thread, as in a DataLoader worker: the small element-wise ops of the
    # transform run 3x slower with 2 threads on 2 busy cores (measured with pyinstrument).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    count, start = 0, time.perf_counter()
    for entry in slides:
        rows = grids[entry.slide_id].head(limit or len(grids[entry.slide_id])).select("x", "y", "level", "read_size", "out_size").iter_rows()
        with Slide(entry.path, entry.slide_id, entry.mpp) as slide:
            for x, y, level, read_size, out_size in rows:
                preprocess(slide.read_patch(x, y, level, read_size, out_size))
                count += 1
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return count, elapsed


def bench_forward(clip, n, batch_size) -> tuple[int, float]:
    batch = torch.randn(batch_size, 3, clip.input_size, clip.input_size)
    encode_images(clip, batch)  # warm-up
    count, start = 0, time.perf_counter()
    while count < n:
        encode_images(clip, batch)
        count += batch_size
    return count, time.perf_counter() - start


def bench_e2e(slides, params, limit, threads) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for entry in slides:
            grid_path = Path(f"data/tiles/{entry.slide_id}.parquet")
            if limit:
                grid_path = Path(tmp) / f"{entry.slide_id}.parquet"
                pl.read_parquet(f"data/tiles/{entry.slide_id}.parquet").head(limit).write_parquet(grid_path)
            features = run_embed(entry.path, entry.slide_id, grid_path, params["clip"], params["embed"],
                                 Path(tmp) / f"{entry.slide_id}.zarr", entry.mpp, threads=threads, progress=False)
            count += len(features)
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=0, help="patches per slide (0: all)")
    parser.add_argument("--workers", type=int, help="override embed.num_workers")
    parser.add_argument("--batch-size", type=int, help="override embed.batch_size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median reported)")
    args = parser.parse_args()

    params = load_params(args.params)
    if args.workers is not None:
        params["embed"]["num_workers"] = args.workers
    if args.batch_size is not None:
        params["embed"]["batch_size"] = args.batch_size
    torch.set_num_threads(args.threads)
    slides = read_manifest(params["manifest"])
    grids = {s.slide_id: pl.read_parquet(f"data/tiles/{s.slide_id}.parquet") for s in slides}
    clip = load_clip(params["clip"], params["embed"]["device"])
    limit = args.limit or None

    def rate(fn, *fn_args):
        runs = [fn(*fn_args) for _ in range(args.repeat)]
        return statistics.median(n / t for n, t in runs), runs[0][0]

    read_rate, n = rate(bench_read, slides, grids, clip.preprocess, limit)
    forward_rate, _ = rate(bench_forward, clip, n, params["embed"]["batch_size"])
    e2e_rate, _ = rate(bench_e2e, slides, params, limit, args.threads)
    print(f"device={clip.device} model={clip.name} patches={n} batch={params['embed']['batch_size']} "
          f"workers={params['embed']['num_workers']} threads={args.threads}")
    print(f"read     {read_rate:9.1f} patches/s")
    print(f"forward  {forward_rate:9.1f} patches/s")
    print(f"e2e      {e2e_rate:9.1f} patches/s")
    print(f"ratio e2e / min(read, forward) = {e2e_rate / min(read_rate, forward_rate):.2f}")


if __name__ == "__main__":
    main()
