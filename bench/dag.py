"""Cost of planning the DAG at cohort scale: `snakemake -n` on manifests of 100, 1,000 and 7,500 slides.

    python bench/dag.py [--sizes 100 1000 7500]

Builds a throwaway project per size (this workflow, placeholder slide and model
files: planning never opens them) and prints, per size, the planned jobs,
seconds and peak memory of `snakemake -n`, and the per-job cost. The target for
the paper's ~7,500 TCGA slides is <= 60 s and <= 2 GB.
"""

from __future__ import annotations

import argparse
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


def make_project(root: Path, slides: int) -> None:
    shutil.copy2(ROOT / "Snakefile", root / "Snakefile")
    for name in ("rules", "profiles", "report"):
        shutil.copytree(ROOT / name, root / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
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


def plan(root: Path) -> tuple[int, float, float]:
    """(planned jobs, seconds, peak MB) of `snakemake -n` in `root`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "2", "--quiet", "rules"], cwd=root,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{proc.stdout}\n{proc.stderr}")
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    total = re.search(r"^total\s+(\d+)", proc.stdout, re.MULTILINE)
    return int(total.group(1)) if total else 0, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 7500])
    args = parser.parse_args()
    print(f"{'slides':>7} {'jobs':>7} {'seconds':>8} {'peak MB':>8} {'ms/job':>7}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            make_project(Path(tmp), size)
            jobs, seconds, peak = plan(Path(tmp))
        print(f"{size:>7} {jobs:>7} {seconds:>8.1f} {peak:>8.0f} {1000 * seconds / max(jobs, 1):>7.2f}")


if __name__ == "__main__":
    main()
