"""Which pipeline steps run on a GPU, and how many GPUs this machine has (no torch import: the
Snakefile asks while it plans the DAG).

A step "needs a GPU" when its model would run on one as configured in params.yaml: `device: cuda`,
or `device: auto` (which picks CUDA wherever the job has one); a llama.cpp agent with
`n_gpu_layers` other than 0; an openai-engine agent whose server the job launches itself (a `url:`
server runs elsewhere and the job only sends requests). The workflow gives those rules a `gpu`
resource of 1: locally Snakemake bounds the concurrent ones by the GPUs present (so two 13B jobs
never share one GPU; with none present the requests are scaled down to 0 and the jobs run on
CPU); the SLURM executor turns it into `--gpus=1`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")  # one directory per GPU the driver sees

# The params.yaml section of each step's model. select runs where embed runs (on a cluster the two
# share a group job, which has one GPU or none) and clusters on that GPU.
STEP_MODEL = {"embed": "embed", "select": "embed", "caption": "describe", "revise": "revise",
              "summarize": "summarize"}


def agent_needs_gpu(cfg: Mapping[str, Any]) -> bool:
    """Whether a model configured by `cfg` (an agent section of params.yaml, or `embed`) runs on a GPU."""
    engine = cfg.get("engine")
    if engine == "openai":
        openai = cfg.get("openai") or {}
        return bool(openai.get("launch")) and cfg.get("device", "auto") != "cpu"
    if engine == "llama_cpp":
        return int(cfg.get("n_gpu_layers", 0)) != 0
    return str(cfg.get("device", "auto")) != "cpu"


def gpu_request(config: Mapping[str, Any], step: str) -> int:
    """The `gpu` resource of `step`'s jobs: 1 when its model runs on a GPU, else 0."""
    return int(agent_needs_gpu(config[STEP_MODEL[step]]))


def visible_gpus(environ: Mapping[str, str] = os.environ, proc: Path = NVIDIA_PROC) -> int:
    """NVIDIA GPUs this process may use: the driver's devices, limited by CUDA_VISIBLE_DEVICES when it
    is set ("" or "-1": none). Without the driver's /proc entries, `nvidia-smi -L`; else 0."""
    if proc.is_dir():
        present = sum(1 for p in proc.iterdir() if p.is_dir())
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        present = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    else:
        present = 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    entries = [e for e in (s.strip() for s in visible.split(",")) if e]
    if not entries or entries[0] == "-1":
        return 0
    return min(present, len(entries))
