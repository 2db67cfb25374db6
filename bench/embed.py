"""Embed throughput on the demo slides: the JPEG decode bound, the patch readers, the forward pass, end to end.

    python bench/embed.py [--params params.yaml] [--limit N] [--read-limit N] [--readers N] [--batch-size N] [--threads N]
                          [--precision auto|fp64|fp32|fp16|bf16] [--model ViT-L-14-336] [--repeat N]

Prints patches/s for
  decode   PIL decode of the same patches stored as JPEGs at the pipeline's quality (patches.jpeg_quality,
           pathgen.store.io.encode_jpeg), 672 px, one process, one thread: the bound a reader can approach
  read     old: OpenSlide read_region (672 px) + the model's preprocess (bicubic to 336, ToTensor, Normalize);
           new: embed's reader (`embed.reader`, tiles: stored JPEG tiles decoded at the model's scale) up to
           what a DataLoader worker hands over (on CPU the normalised input, on CUDA uint8 pixels); one
           process, one thread; each also as a ratio to decode
  forward  encode_image on a batch already in memory, at embed.precision
  e2e      the embed step as the pipeline runs it (reader processes, forward; with the params' model also
           the Zarr write), and e2e / min(new read x readers, forward): 1.0 means the step runs as fast as
           its slowest part, readers counted in parallel; also per patch, past each slide's fixed costs
           (model load, reader start-up, Zarr write; measured on one batch per slide and subtracted)
--model ViT-L-14-336 runs forward and e2e with that open_clip architecture and random weights
(pretrained=None: nothing is downloaded); on CPU it embeds < 1 patch/s, so keep --limit small.
Reads data/tiles/ and the manifest (run `make demo` first); writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathgen.config import load_params  # noqa: E402
from pathgen.models.clip import ClipModel, encode_images, load_clip, with_dtype  # noqa: E402
from pathgen.steps.embed import (  # noqa: E402
    PRECISIONS, ModelInput, PatchDataset, embed_patches, resolve_precision, run_embed, weights_dtype)
from pathgen.store.io import encode_jpeg  # noqa: E402
from pathgen.store.manifest import read_manifest  # noqa: E402
from pathgen.wsi.slide import Slide  # noqa: E402


def patch_rows(grid: pl.DataFrame, limit: int | None):
    return list(grid.head(limit or grid.height).select("x", "y", "level", "read_size", "out_size").iter_rows())


def one_thread(fn):
    # One torch thread, as in a DataLoader worker.
    def wrapped(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return wrapped


@one_thread
def bench_decode(jpegs: list[bytes]) -> tuple[int, float]:
    start = time.perf_counter()
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(jpegs), time.perf_counter() - start


@one_thread
def bench_old_read(slides, grids, preprocess, limit) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    for entry in slides:
        with Slide(entry.path, entry.slide_id, entry.mpp) as slide:
            for x, y, level, read_size, out_size in patch_rows(grids[entry.slide_id], limit):
                preprocess(slide.read_patch(x, y, level, read_size, out_size))
                count += 1
    return count, time.perf_counter() - start


@one_thread
def bench_new_read(slides, grids, model_input, reader, normalize, limit) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    for entry in slides:
        grid = grids[entry.slide_id].head(limit or grids[entry.slide_id].height)
        dataset = PatchDataset(entry.path, entry.slide_id, entry.mpp, grid, model_input, reader, normalize)
        for index in range(len(dataset)):
            _, pixels, _, error = dataset[index]
            if error:
                raise SystemExit(error)
            count += 1
    return count, time.perf_counter() - start


def bench_forward(clip, model_input, n, batch_size, precision) -> tuple[int, float]:
    pixels = torch.randint(0, 256, (batch_size, clip.input_size, clip.input_size, 3), dtype=torch.uint8)
    batch = model_input.normalize(pixels, clip.device)
    dtype = PRECISIONS[precision]
    encode_images(clip, batch, dtype)  # warm-up
    count, start = 0, time.perf_counter()
    while count < n:
        encode_images(clip, batch, dtype)
        count += batch_size
    return count, time.perf_counter() - start


def bench_e2e(slides, params, limit, threads, readers, clip=None, precision=None) -> tuple[int, float]:
    """The step end to end; with `clip` (a model built here) the loader and forward without the Zarr write."""
    count, start = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for entry in slides:
            grid_path = Path(f"data/tiles/{entry.slide_id}.parquet")
            grid = pl.read_parquet(grid_path).head(limit or None) if limit else pl.read_parquet(grid_path)
            if clip is not None:
                dataset = PatchDataset(entry.path, entry.slide_id, entry.mpp, grid,
                                       ModelInput(clip.preprocess, clip.input_size), params["embed"]["reader"],
                                       normalize=clip.device.type == "cpu")
                workers = min(readers, max(0, len(dataset) // params["embed"]["batch_size"]))
                count += len(embed_patches(clip, dataset, params["embed"]["batch_size"], workers, precision, False)[0])
                continue
            if limit:
                grid_path = Path(tmp) / f"{entry.slide_id}.parquet"
                grid.write_parquet(grid_path)
            features = run_embed(entry.path, entry.slide_id, grid_path, params["clip"], params["embed"],
                                 Path(tmp) / f"{entry.slide_id}.zarr", entry.mpp, threads=threads, progress=False,
                                 readers=readers)
            count += len(features)
    return count, time.perf_counter() - start


def random_clip(base: ClipModel, model_name: str) -> ClipModel:
    """`base` with `model_name`'s architecture and random weights (open_clip, pretrained=None)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device=base.device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return dataclasses.replace(base, name=model_name, model=model.eval(), preprocess=preprocess,
                               tokenizer=open_clip.get_tokenizer(model_name), input_size=size,
                               fingerprint="random", checkpoint_sha256="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=0, help="patches per slide (0: all; default 4 with --model)")
    parser.add_argument("--read-limit", type=int, help="patches per slide of the decode and read figures (default: --limit)")
    parser.add_argument("--readers", type=int, default=2, help="reader processes of the e2e run")
    parser.add_argument("--batch-size", type=int, help="override embed.batch_size")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], help="override embed.precision")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the forward")
    parser.add_argument("--model", help="open_clip architecture with random weights (e.g. ViT-L-14-336) for forward/e2e")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median reported)")
    args = parser.parse_args()

    params = load_params(args.params)
    if args.batch_size is not None:
        params["embed"]["batch_size"] = args.batch_size
    if args.precision is not None:
        params["embed"]["precision"] = args.precision
    torch.set_num_threads(args.threads)
    slides = read_manifest(params["manifest"])
    grids = {s.slide_id: pl.read_parquet(f"data/tiles/{s.slide_id}.parquet") for s in slides}
    limit = args.limit or (4 if args.model else None)
    clip = load_clip(params["clip"], params["embed"]["device"])
    model_input = ModelInput(clip.preprocess, clip.input_size)
    batch_size = params["embed"]["batch_size"]

    def rate(fn, *fn_args):
        runs = [fn(*fn_args) for _ in range(args.repeat)]
        return statistics.median(n / t for n, t in runs), runs[0][0]

    # Readers: always on the params' patches (the reader does not depend on the model's weights).
    read_limit = (args.limit if args.read_limit is None else args.read_limit) or None
    jpegs = []
    for entry in slides:
        with Slide(entry.path, entry.slide_id, entry.mpp) as slide:
            jpegs += [encode_jpeg(slide.read_patch(*row), params["patches"]["jpeg_quality"])
                      for row in patch_rows(grids[entry.slide_id], read_limit)]
    decode_rate, n_read = rate(bench_decode, jpegs)
    old_rate, _ = rate(bench_old_read, slides, grids, clip.preprocess, read_limit)
    # On CPU the readers also normalise (the main process only runs the forward), as in run_embed.
    new_rate, _ = rate(bench_new_read, slides, grids, model_input, params["embed"]["reader"],
                       clip.device.type == "cpu", read_limit)

    model_clip = random_clip(clip, args.model) if args.model else clip
    precision = resolve_precision(params["embed"]["precision"], model_clip.device)
    model_clip = with_dtype(model_clip, weights_dtype(precision))  # bench_forward calls encode_images itself
    n_e2e = sum(min(limit or g.height, g.height) for g in grids.values())
    forward_rate, _ = rate(bench_forward, model_clip, ModelInput(model_clip.preprocess, model_clip.input_size),
                           min(n_e2e, 4 * batch_size), batch_size, precision)
    e2e_runs = [bench_e2e(slides, params, limit, args.threads, args.readers, model_clip if args.model else None,
                          precision) for _ in range(args.repeat)]
    e2e_rate, n_e2e = statistics.median(n / t for n, t in e2e_runs), e2e_runs[0][0]
    # Per-slide fixed costs (model load, reader start-up, Zarr write) against the per-patch rate: the same
    # run on one batch per slide, subtracted.
    small = [bench_e2e(slides, params, batch_size, args.threads, args.readers, model_clip if args.model else None,
                       precision) for _ in range(args.repeat)]
    n_small, t_small = small[0][0], statistics.median(t for _, t in small)
    t_full = statistics.median(t for _, t in e2e_runs)
    marginal = (n_e2e - n_small) / (t_full - t_small) if n_e2e > n_small and t_full > t_small else float("nan")
    fixed = (t_small - n_small / marginal) / len(slides) if marginal == marginal else float("nan")

    print(f"device={model_clip.device} model={model_clip.name} precision={precision} reader={params['embed']['reader']} "
          f"batch={batch_size} readers={args.readers} threads={args.threads} "
          f"read patches={n_read} e2e patches={n_e2e} jpeg_quality={params['patches']['jpeg_quality']}")
    print(f"decode       {decode_rate:9.1f} patches/s/core  (PIL JPEG decode, 672 px: the bound)")
    print(f"read old     {old_rate:9.1f} patches/s/core  = {old_rate / decode_rate:.2f} x decode  (OpenSlide + preprocess)")
    print(f"read new     {new_rate:9.1f} patches/s/core  = {new_rate / decode_rate:.2f} x decode  "
          f"({new_rate / old_rate:.1f} x old)")
    print(f"forward      {forward_rate:9.1f} patches/s")
    print(f"e2e          {e2e_rate:9.1f} patches/s  (per patch, past each slide's fixed {fixed:.2f} s: "
          f"{marginal:.1f} patches/s)")
    parallel_read = new_rate * max(1, args.readers)
    print(f"ratio e2e / min(read new x {max(1, args.readers)} readers, forward) = "
          f"{e2e_rate / min(parallel_read, forward_rate):.2f};  e2e / min(read new, forward) = "
          f"{e2e_rate / min(new_rate, forward_rate):.2f};  per patch: {marginal / min(parallel_read, forward_rate):.2f}")


if __name__ == "__main__":
    main()
