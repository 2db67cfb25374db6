"""Which jobs ask for a GPU, how many a local run allows at once, and what the SLURM profile requests."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT, snakemake
from pathgen.models.gpus import STEP_MODEL, agent_needs_gpu, gpu_request, visible_gpus

GPU_STEPS = {"embed", "select", "caption", "revise"}  # params.yaml as shipped: summarize has n_gpu_layers 0


def planned_resources(out: str) -> dict[str, set[str]]:
    """Rule -> the distinct `resources:` lines of its jobs in a dry run's listing."""
    found: dict[str, set[str]] = {}
    rule = None
    for line in out.splitlines():
        match = re.match(r"^\s*(?:local)?rule (\w+):$", line)
        if match:
            rule = match.group(1)
        elif rule and line.strip().startswith("resources:"):
            found.setdefault(rule, set()).add(line.strip()[len("resources:"):].strip())
    return found


def resource(lines: set[str], name: str) -> set[str | None]:
    values = set()
    for line in lines:
        pairs = dict(item.split("=", 1) for item in line.split(", "))
        values.add(pairs.get(name))
    return values


def test_gpu_request_follows_each_agents_engine_and_device():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert {step for step in STEP_MODEL if gpu_request(params, step)} == GPU_STEPS
    assert agent_needs_gpu({"engine": "transformers", "device": "auto"})
    assert agent_needs_gpu({"engine": "transformers", "device": "cuda:1"})
    assert not agent_needs_gpu({"engine": "transformers", "device": "cpu"})
    assert not agent_needs_gpu({"device": "cpu"})  # embed's CLIP
    assert agent_needs_gpu({"engine": "llama_cpp", "n_gpu_layers": -1})
    assert not agent_needs_gpu({"engine": "llama_cpp", "n_gpu_layers": 0})
    # a server the job launches runs on the job's GPU; one at a URL runs elsewhere
    assert agent_needs_gpu({"engine": "openai", "openai": {"launch": "vllm serve {checkpoint}", "url": None}})
    assert not agent_needs_gpu({"engine": "openai", "openai": {"launch": None, "url": "http://gpu-node:8000/v1"}})
    params["embed"]["device"] = "cpu"
    assert not gpu_request(params, "embed") and not gpu_request(params, "select")


def test_visible_gpus_counts_driver_devices_limited_by_cuda_visible_devices(tmp_path):
    proc = tmp_path / "gpus"
    for address in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (proc / address).mkdir(parents=True)
    assert visible_gpus({}, proc) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}, proc) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}, proc) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4"}, proc) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, proc) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, proc) == 0
    (tmp_path / "empty").mkdir()
    assert visible_gpus({}, tmp_path / "empty") == 0


@pytest.fixture(scope="module")
def dry_runs(demo_inputs, tmp_path_factory) -> dict[str, dict[str, set[str]]]:
    """Resources of every planned job: locally as is, locally with one GPU, and through the SLURM profile."""
    import shutil

    root = tmp_path_factory.mktemp("profiles") / "project"
    shutil.copytree(demo_inputs, root, symlinks=True)
    return {
        "local": planned_resources(snakemake(root, "-n", "-F").stdout),
        "one-gpu": planned_resources(snakemake(root, "-n", "-F", "--resources", "gpu=1").stdout),
        "slurm": planned_resources(snakemake(root, "-n", "-F", "--profile", str(root / "profiles" / "slurm")).stdout),
    }


def test_model_jobs_request_a_gpu_and_local_runs_allow_one_per_gpu_present(dry_runs):
    one_gpu, local = dry_runs["one-gpu"], dry_runs["local"]
    assert set(one_gpu) >= GPU_STEPS | {"summarize", "assemble", "assemble_shard"}
    for rule, lines in one_gpu.items():
        expected = {"1"} if rule in GPU_STEPS else {"0"} if rule == "summarize" else {None}
        assert resource(lines, "gpu") == expected, (rule, lines)
    # Without --resources the run allows as many GPU jobs at once as this machine has GPUs, and a job's
    # request is scaled down to that: none here, so the model jobs plan to run on CPU.
    present = str(min(1, visible_gpus()))
    for rule in GPU_STEPS:
        assert resource(local[rule], "gpu") == {present}, (rule, local[rule])


def test_slurm_profile_sizes_model_jobs_for_real_checkpoints_on_gpu_partitions(dry_runs):
    slurm = dry_runs["slurm"]
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    for rule in GPU_STEPS:
        assert resource(slurm[rule], "gpu") == {"1"}, (rule, slurm[rule])
        assert resource(slurm[rule], "slurm_partition") == {"YOUR_GPU_PARTITION"}
        assert resource(slurm[rule], "mem_mb") == {str(profile["set-resources"][rule]["mem_mb"])}
    assert resource(slurm["caption"], "mem_mb") == {"64000"}  # a 13B LLaVA in fp16 is 26 GB of weights
    assert resource(slurm["assemble"], "slurm_partition") == {"YOUR_PARTITION"}
    assert resource(slurm["assemble"], "gpu") == {None}
    # the demo's own sizes hold for a local run
    assert resource(dry_runs["local"]["caption"], "mem_mb") == {"8000"}
