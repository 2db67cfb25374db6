"""select on large slides: seconds and peak memory of the new k-means selection against the old one.

    python bench/selection.py [--sizes 10000,30000,100000] [--variants new,sk32,old] [--old-max-n 100000]
                           [--dim 768] [--threads 2]

Synthetic slide: N L2-normalised float16 features (D = 768), patches drawn around 64 random directions
(feature = centre + 0.5 * noise, normalised: within-blob cosine ~0.8), 10 report and 20 attribute prompts
as random unit vectors; k = ceil(sqrt(N)) (317 at 100,000). Each case runs in its own process, so its
peak RSS (ru_maxrss) is its own; the process's baseline (Python, torch, sklearn and the features) is
printed too.

  new  select_patches as it is now: torch k-means (float64 on the CPU), one k-means++ init, Lloyd in
       distance blocks (`--variants new,old --old-ref b64595f`: against the float32 version, same params)
  sk32 select_patches as now but with sklearn's KMeans in float32, n_init=1, max_iter=100 in place of
       the torch k-means (the other candidate for the CPU path)
  old  select_patches of commit `--old-ref` (default OLD_REF, the last one before this change: sklearn
       KMeans in float64, n_init=3, max_iter=300), read with git show

Printed per case: wall seconds, CPU seconds (user + sys: wall is unreliable on a shared machine), peak RSS
in MB, k-means seconds and iterations, the rest of select_patches (scores, ranks, cluster sample,
near-duplicate filter) in seconds; then old / new ratios.
"""

from __future__ import annotations

import os
import sys

# This file is named select.py: keep its folder off the import path, or it shadows the standard select module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "6ec97f4"  # the last commit with the sklearn float64 n_init=3 selection


def synthetic(n: int, dim: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim), dtype=np.float32)
    features = np.empty((n, dim), np.float16)
    for start in range(0, n, 8192):  # in blocks: the generator's temporaries stay small
        m = min(8192, n - start)
        block = centres[rng.integers(0, 64, m)] + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        features[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    coords = np.stack([np.arange(n) % 1000, np.arange(n) // 1000], axis=1).astype(np.int64) * 672

    def unit(m):
        t = rng.standard_normal((m, dim), dtype=np.float32)
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    return features, coords, unit(10), unit(20)


PARAMS = {"report_top_k": 64, "attribute_top_k": 64, "combine": "max", "cluster_samples": 256,
          "kmeans_n_init": 1, "kmeans_max_iter": 100, "kmeans_tol": 1e-4, "device": "cpu",
          "similarity_threshold": 0.88, "drop_exponent": 1.0}
OLD_PARAMS = {**PARAMS, "kmeans_n_init": 3, "kmeans_max_iter": 300}


def one(which: str, n: int, dim: int, old_ref: str) -> dict:
    import importlib.util

    import numpy as np
    import torch  # noqa: F401  (the import is part of both baselines)

    sys.path.insert(0, str(ROOT))
    if which in ("new", "sk32"):
        import pathgen.steps.select as module

        params = PARAMS
        if which == "sk32":
            from sklearn.cluster import KMeans

            def sklearn_kmeans(features, seed, n_init, max_iter, tol, device):
                km = KMeans(n_clusters=math.ceil(math.sqrt(len(features))), n_init=n_init, max_iter=max_iter,
                            tol=tol, random_state=seed % (2**32))
                labels = km.fit_predict(features.astype(np.float32)).astype(np.int64)
                return module.KMeansResult(labels, float(km.inertia_), int(km.n_iter_), "cpu")

            module.kmeans = sklearn_kmeans
    else:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{old_ref}:pathgen/steps/select.py"],
                                check=True, capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "select_old.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("select_old", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["select_old"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        params = OLD_PARAMS if old_ref == OLD_REF else PARAMS  # another ref: the current params
    features16, coords, report, attribute = synthetic(n, dim)
    features = features16.astype(np.float32)  # as read_embeddings returns them
    del features16
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timing = {}
    name = "kmeans_labels" if which == "old" and old_ref == OLD_REF else "kmeans"  # what select_patches calls
    inner = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        timing["kmeans_s"] = time.perf_counter() - start
        timing["iterations"] = getattr(result, "iterations", None)
        return result

    setattr(module, name, timed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    selection = module.select_patches(features, coords, report, attribute, params, 0, f"bench-{n}", None)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"which": which, "n": n, "k": math.ceil(math.sqrt(n)), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "kmeans_s": round(timing["kmeans_s"], 2), "rest_s": round(wall - timing["kmeans_s"], 2),
            "iterations": timing["iterations"], "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "baseline_rss_mb": round(baseline_mb), "candidates": selection.height,
            "kept": int(selection["kept"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--old-max-n", type=int, default=100000, help="run the old selection up to this N")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (the CI has 2 cores)")
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--variants", default="new,sk32,old", help="which of new, sk32, old to run")
    parser.add_argument("--one", nargs=2, metavar=("WHICH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.dim, args.old_ref)))
        return
    env = {**os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OPENBLAS_NUM_THREADS")}}
    print(f"{os.cpu_count()} CPUs, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for which in args.variants.split(","):
            if which == "old" and n > args.old_max_n:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", which, str(n), "--dim", str(args.dim),
                                  "--old-ref", args.old_ref], check=True, capture_output=True, text=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    by = {(r["which"], r["n"]): r for r in rows}
    for other in ("sk32", "old"):
        print(f"ratios {other} / new:")
        for n in sorted({r["n"] for r in rows}):
            if (other, n) not in by:
                continue
            if ("new", n) not in by:
                continue
            old, new = by[other, n], by["new", n]
            print(f"  n={n}: wall {old['wall_s'] / new['wall_s']:.2f}x  cpu {old['cpu_s'] / new['cpu_s']:.2f}x  "
                  f"k-means {old['kmeans_s'] / new['kmeans_s']:.2f}x  peak RSS {old['peak_rss_mb'] / new['peak_rss_mb']:.2f}x"
                  f"  (above baseline {(old['peak_rss_mb'] - old['baseline_rss_mb']) / max(1, new['peak_rss_mb'] - new['baseline_rss_mb']):.2f}x)")


if __name__ == "__main__":
    main()
