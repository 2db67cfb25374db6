"""Cost of planning the DAG at cohort scale: `snakemake -n` and `dvc status` on 100, 1,000 and 7,500 slides.

    python bench/dag.py [--sizes 100 1000 7500] [--slides-per-shard 32]

Builds a throwaway project per size (this workflow and code, placeholder slide
and model files: planning never opens them) and prints, per size, the planned
jobs, seconds and peak memory of `snakemake -n`, the per-job cost, and the
seconds of `pathgen dvc-yaml` and `dvc status` on the generated dvc.yaml. The
target for the paper's ~7,500 TCGA slides is <= 60 s and <= 2 GB for
`snakemake -n`.

Shards: the demo's params.yaml packs 2 slides per shard so that its 3 slides
make 2 shards; a cohort packs more (32 slides of ~220 pairs make a ~7,000-pair
WebDataset tar, and each model job loads its checkpoint once per shard).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(root: Path, slides: int, slides_per_shard: int) -> None:
    shutil.copy2(ROOT / "Snakefile", root / "Snakefile")
    for name in ("rules", "profiles", "report"):
        shutil.copytree(ROOT / name, root / name)
    shutil.copytree(ROOT / "pathgen", root / "pathgen", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["shards"]["slides_per_shard"] = slides_per_shard
    for path in (params["clip"]["checkpoint"], params["clip"]["config"], params["summarize"]["checkpoint"],
                 f"{params['describe']['checkpoint']}/config.json", f"{params['revise']['checkpoint']}/config.json"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"placeholder")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data/wsi").mkdir(parents=True)
    lines = ["slide_id\tpath\ttissue\tproject\tmpp\treport"]
    for i in range(slides):
        (root / f"data/wsi/S{i:05d}.svs").write_bytes(b"")
        lines.append(f"S{i:05d}\tdata/wsi/S{i:05d}.svs\tlung\tTCGA-LUAD\t\t")
    (root / "data/slides.tsv").write_text("\n".join(lines) + "\n")


def timed(cmd: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc, seconds


def plan(root: Path) -> tuple[int, float, float]:
    """(planned jobs, seconds, peak MB) of `snakemake -n` in `root` (run first: the peak is its own)."""
    proc, seconds = timed([str(BIN / "snakemake"), "-n", "--cores", "2", "--quiet", "rules"], root)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    total = re.search(r"^total\s+(\d+)", proc.stdout, re.MULTILINE)
    return int(total.group(1)) if total else 0, seconds, peak


def dvc_costs(root: Path) -> tuple[float, float]:
    """Seconds of `pathgen dvc-yaml` and of `dvc status` in `root`."""
    _, generate = timed([str(BIN / "pathgen"), "dvc-yaml"], root)
    timed([str(BIN / "dvc"), "init", "--no-scm", "-q"], root)
    _, status = timed([str(BIN / "dvc"), "status"], root)
    return generate, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 7500])
    parser.add_argument("--slides-per-shard", type=int, default=32)
    parser.add_argument("--no-dvc", action="store_true", help="time snakemake -n only")
    args = parser.parse_args()
    print(f"slides per shard: {args.slides_per_shard}")
    print(f"{'slides':>7} {'jobs':>7} {'snakemake -n s':>15} {'peak MB':>8} {'ms/job':>7} {'dvc-yaml s':>10} {'dvc status s':>12}")
    for size in args.sizes:
        # one process per size, so ru_maxrss of the children is this size's snakemake alone
        if len(args.sizes) > 1:
            cmd = [sys.executable, __file__, "--sizes", str(size), "--slides-per-shard", str(args.slides_per_shard)]
            out = subprocess.run(cmd + (["--no-dvc"] if args.no_dvc else []), capture_output=True, text=True, check=True)
            print(out.stdout.splitlines()[-1], flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            make_project(Path(tmp), size, args.slides_per_shard)
            jobs, seconds, peak = plan(Path(tmp))
            generate, status = (float("nan"), float("nan")) if args.no_dvc else dvc_costs(Path(tmp))
        print(f"{size:>7} {jobs:>7} {seconds:>15.1f} {peak:>8.0f} {1000 * seconds / max(jobs, 1):>7.2f}"
              f" {generate:>10.1f} {status:>12.1f}")


if __name__ == "__main__":
    main()
