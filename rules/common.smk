# Shared by all rules: params.yaml validation, the slide manifest, input functions.
# No pipeline logic here: every step is a `pathgen` command.

import json
import os
from pathlib import Path

from pathgen.config import step_params_json, validate_params
from pathgen.errors import PathgenError
from pathgen.lineage.codehash import code_hash
from pathgen.lineage.run_end import on_error, on_success
from pathgen.models.fingerprint import checkpoint_files
from pathgen.models.gpus import STEP_MODEL, gpu_request, visible_gpus
from pathgen.store.manifest import SLIDE_ID, read_manifest
from pathgen.store.shards import shard_slides

try:
    validate_params(config, source="params.yaml (with --config overrides)")
    SLIDES = {entry.slide_id: entry for entry in read_manifest(config["manifest"])}
except PathgenError as exc:
    raise WorkflowError(f"pathgen: {exc}") from None

SLIDE_IDS = sorted(SLIDES)
# Shards follow manifest order, so appending slides only adds shards.
SHARDS = shard_slides(list(SLIDES), config["shards"]["slides_per_shard"])

# The `gpu` resource of each model step: 1 when params.yaml puts its model on a GPU (pathgen.models.gpus).
GPU = {step: gpu_request(config, step) for step in STEP_MODEL}
# Locally, at most one model job per GPU present (`--resources gpu=N` overrides; with none present the
# requests scale down to 0 and the jobs run on CPU, and a dry run shows them so). A run that submits
# jobs (`--jobs`, as profiles/slurm sets) leaves GPUs to the cluster: each job gets one of its own.
# The executor is not known while the Snakefile is read; `--jobs` is what Snakemake's own scheduler
# goes by too (it stops counting local cores then).
if workflow.global_resources["_nodes"].value is None and "gpu" not in workflow.global_resources:
    workflow.register_resource("gpu", visible_gpus())


wildcard_constraints:
    slide=SLIDE_ID.pattern.strip("^$"),
    shard=r"\d{5}",


def step_view(step):
    """The step's params.yaml sections as JSON; a function, so '{...}' in values is not a wildcard."""
    return lambda wildcards: step_params_json(config, step)


ON_SLIDE_ERROR = config["on_slide_error"]  # a shell-string global: changing it reruns nothing


def _existing(path):
    """[path] when the file exists, else []: a missing slide or report file is the slide's input error
    (its job quarantines it), not a planning error that stops every slide. When the file appears, the
    changed set of inputs reruns the slide."""
    return [path] if path and Path(path).exists() else []


def slide_path(wildcards):
    return _existing(SLIDES[wildcards.slide].path)


def slide_file(wildcards):
    return SLIDES[wildcards.slide].path


def slide_mpp(wildcards):
    mpp = SLIDES[wildcards.slide].mpp
    return "" if mpp is None else repr(mpp)


def slide_report(wildcards):
    return _existing(SLIDES[wildcards.slide].report)


def slide_report_file(wildcards):
    return SLIDES[wildcards.slide].report or ""


def shard_status(wildcards):
    return [f"data/patches/{slide}.status.json" for slide in SHARDS[wildcards.shard]]


def clip_files(wildcards):
    files = [config["clip"]["checkpoint"]]
    if config["clip"]["config"]:
        files.append(config["clip"]["config"])
    return files


def model_files(agent):
    """Input function: the files of an agent's checkpoint (the path itself while it is missing)."""

    def files(wildcards):
        try:
            return [str(p) for p in checkpoint_files(config[agent]["checkpoint"], agent)]
        except PathgenError:
            return [config[agent]["checkpoint"]]

    return files


def shard_patch_tars(wildcards):
    return [f"data/patches/{slide}.tar" for slide in SHARDS[wildcards.shard]]


def shard_slides_json(wildcards):
    entries = [SLIDES[s] for s in SHARDS[wildcards.shard]]
    return json.dumps([{"slide_id": e.slide_id, "tissue": e.tissue, "project": e.project} for e in entries])


def cache_args(wildcards):
    # PATHGEN_CACHE_ROOT: another item cache for this run (pathgen audit's rebuild); the root is where
    # answers are kept, never what they are, so it is no part of any output's lineage.
    root = os.environ.get("PATHGEN_CACHE_ROOT") or config["cache"]["root"]
    return f"--cache-dir {root} --flush-every {config['cache']['flush_every']}"


def shard_entries_json(wildcards):
    """The shard's manifest rows, as assemble records them."""
    return json.dumps([vars(SLIDES[s]) for s in SHARDS[wildcards.shard]], sort_keys=True)
