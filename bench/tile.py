"""Tile-step memory on a large slide with only 1x and 4x levels: old whole-level read vs the blockwise thumbnail.

    python bench/tile.py [--width 100000] [--height 80000] [--slide PATH] [--skip-old]

Writes a synthetic two-level slide (pathgen.demo.large_slide: downsamples 1 and 4, glass with one
tissue rectangle of 32 x 32 patches) to a temporary folder unless --slide names one, then runs each
measurement in its own process and prints its peak RSS (ru_maxrss from os.wait4 on that process)
and wall seconds:

  baseline   the imports alone (python, numpy, polars, scipy, openslide, pathgen)
  read old   Slide.read_level(best level for tile.mask.downsample): today's read before issue 12, the
             whole 4x level (25,000 x 20,000 px at the default size) as one RGBA read and RGB composite
  read new   Slide.read_thumbnail(tile.mask.downsample): the same level read in bounded blocks, each
             reduced to the mask's downsample
  step new   `pathgen tile` as the pipeline runs it (thumbnail, tissue mask, grid, picture, writes)
  phases     the tile step in-process: seconds and peak RSS so far after each part, and tracemalloc's
             peak allocation of the grid (np.mgrid at the patch size over the whole slide) and of
             draw_thumbnail (both are sized by the thumbnail and the grid, not by the slide's pixels)

and the old / new ratios of the read. The old *step* is not run: after its 500 Mpx read it would
compute the tissue mask on the 4x level itself (int64 and float32 maps of 500 Mpx: tens of GB).
This parent process imports only the standard library, so it adds nothing to its children's peaks
(a child's ru_maxrss starts from its parent's peak at fork). --skip-old leaves out the old read
(~6 GB at the default size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCH = 672

CHILD = r"""
import json, resource, sys, time
mode, wsi, params_path, out = sys.argv[1:5]
import yaml
from pathgen.wsi.slide import Slide
import pathgen.steps.tile as tile
params = yaml.safe_load(open(params_path))["tile"]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
report = {}
if mode == "read-old":
    with Slide(wsi, "large") as slide:
        image = slide.read_level(slide.best_level_for(params["mask"]["downsample"]))
    report["size"] = image.size
elif mode == "read-new":
    with Slide(wsi, "large") as slide:
        image, level = slide.read_thumbnail(params["mask"]["downsample"])
    report["size"] = image.size
elif mode == "phases":
    import tracemalloc
    import numpy as np
    phases = []
    t0 = time.perf_counter()
    def timed(name, fn, trace=False):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            if trace:
                tracemalloc.start()
            result = fn(*args, **kwargs)
            entry = {"phase": name, "seconds": round(time.perf_counter() - start, 2)}
            if trace:
                entry["traced_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
                tracemalloc.stop()
            entry["peak_rss_mb_so_far"] = peak()
            phases.append(entry)
            return result
        return wrapped
    Slide.read_thumbnail = timed("thumbnail", Slide.read_thumbnail)
    tile.tissue_mask = timed("tissue mask", tile.tissue_mask)
    tile.tissue_fractions = timed("tissue fractions", tile.tissue_fractions)
    tile.draw_thumbnail = timed("draw thumbnail", tile.draw_thumbnail, trace=True)
    with Slide(wsi, "large") as slide:
        width, height = slide.dimensions
    def grid():
        ys, xs = np.mgrid[0 : height - 672 + 1 : 672, 0 : width - 672 + 1 : 672]
        return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)
    xs, ys = timed("grid (np.mgrid, 672 px)", grid, trace=True)()
    phases[-1]["cells"] = int(xs.size)
    grid_frame = tile.run_tile(wsi, "large", params, out + "/g.parquet", out + "/t.png", out + "/i.json")
    phases.append({"phase": "run_tile total (incl. writes)", "seconds": round(time.perf_counter() - t0, 2),
                   "peak_rss_mb_so_far": peak(), "patches": grid_frame.height})
    report["phases"] = phases
print(json.dumps(report))
"""


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; its exit status, peak RSS (MB), wall seconds and the JSON its last stdout line holds, if any."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"bench/tile.py: {' '.join(cmd[:3])}... exited {child.returncode}")
    lines = out.strip().splitlines()
    extra = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--slide", help="an existing slide to measure instead of the synthetic one")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--skip-old", action="store_true", help="leave out the old whole-level read (~6 GB)")
    args = ap.parse_args()
    py = sys.executable
    pathgen = str(Path(py).parent / "pathgen")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory(prefix="bench-tile-") as tmp:
        wsi = args.slide
        if wsi is None:
            wsi = f"{tmp}/large.svs"
            w, h = args.width // (4 * PATCH) * (4 * PATCH), args.height // (4 * PATCH) * (4 * PATCH)
            rect = (w // 2 // PATCH * PATCH, h // 4 // PATCH * PATCH)
            rect += (rect[0] + 32 * PATCH, rect[1] + 32 * PATCH)
            made = measure([py, "-c", "import sys; from pathgen.demo.large_slide import write_large_slide; "
                                      "write_large_slide(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "
                                      "[tuple(map(int, sys.argv[4:8]))])",
                            wsi, str(args.width), str(args.height), *map(str, rect)])
            print(f"slide {args.width} x {args.height} px, levels 1x and 4x, {Path(wsi).stat().st_size / 2**20:.0f} MB, "
                  f"written in {made['seconds']:.1f} s")
        rows = {"baseline": measure([py, "-c", CHILD, "baseline", wsi, args.params, tmp])}
        if not args.skip_old:
            rows["read old"] = measure([py, "-c", CHILD, "read-old", wsi, args.params, tmp])
        rows["read new"] = measure([py, "-c", CHILD, "read-new", wsi, args.params, tmp])
        rows["step new"] = measure([pathgen, "tile", wsi, "--slide-id", "large", "--params", args.params,
                                    "--grid", f"{tmp}/g.parquet", "--thumbnail", f"{tmp}/t.png", "--info", f"{tmp}/i.json"])
        phases = measure([py, "-c", CHILD, "phases", wsi, args.params, tmp])
    print(f"{'':10} {'peak RSS MB':>12} {'seconds':>8}  image")
    for name, row in rows.items():
        print(f"{name:10} {row['peak_rss_mb']:12.0f} {row['seconds']:8.1f}  {row.get('size', '')}")
    if "read old" in rows:
        old, new = rows["read old"], rows["read new"]
        print(f"read old / new: peak RSS x{old['peak_rss_mb'] / new['peak_rss_mb']:.1f}, "
              f"seconds x{old['seconds'] / new['seconds']:.2f}")
    print("phases of the new step (in one process):")
    for entry in phases["phases"]:
        print("  " + json.dumps(entry))


if __name__ == "__main__":
    main()
