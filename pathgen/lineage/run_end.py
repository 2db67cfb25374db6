"""What the workflow says when a run ends (Snakemake's onsuccess / onerror handlers in the Snakefile).

On success: the quarantined slides, and the model steps' throughput
(logs/throughput.json: machine-dependent, so never part of the dataset). On error: the same, and then the dataset
is assembled from the shards whose jobs all completed, the others named as
incomplete (failures.tsv, metrics.json `complete: false`). So a failed run
never leaves the previous build's `data/dataset/` beside outputs of the new
parameters, and open_clip always finds a `sizes.json` that matches the tars.
The shards left out rerun with the next run: their missing outputs are rebuilt
and the dataset is assembled again.
"""

from __future__ import annotations

import sys
from typing import Any

from pathgen.errors import PathgenError
from pathgen.store.status import run_summary

# Rules in pipeline order: the first unfinished one of a shard is where it stopped.
SHARD_RULES = ("embed", "select", "caption", "revise", "summarize", "assemble_shard")


def unfinished_jobs(workflow: Any) -> list[Any]:
    """The jobs of this run that needed to run and did not finish (failed, or blocked by a failure)."""
    try:
        dag = workflow.dag
    except Exception:  # the run ended before Snakemake built its DAG
        return []
    if dag is None:
        return []
    return list(dag.needrun_jobs(exclude_finished=True))


def incomplete_shards(jobs: list[Any], shards: dict[str, list[str]]) -> dict[str, str]:
    """shard -> why, for every shard one of whose jobs in `jobs` did not finish."""
    shard_of = {slide: shard for shard, slides in shards.items() for slide in slides}
    stopped: dict[str, tuple[int, str]] = {}
    for job in jobs:
        rule = job.rule.name
        if rule not in SHARD_RULES:
            continue
        wildcards = dict(job.wildcards_dict)
        shard = wildcards.get("shard") or shard_of.get(wildcards.get("slide", ""))
        if shard is None:
            continue
        what = f"{rule} job of slide {wildcards['slide']}" if "slide" in wildcards else f"{rule} job"
        logs = [str(f) for f in getattr(job, "log", [])]
        why = f"its {what} did not complete" + (f" (log: {logs[0]})" if logs else "")
        rank = (SHARD_RULES.index(rule), why)
        if shard not in stopped or rank < stopped[shard]:
            stopped[shard] = rank
    return {shard: why for shard, (_, why) in sorted(stopped.items())}


def on_success(slide_ids: list[str], log_root: str = "logs") -> None:
    from pathgen.reporting.throughput import format_throughput, step_throughput
    from pathgen.store.io import write_json

    summary = run_summary(slide_ids)
    if summary:
        print(summary, file=sys.stderr)
    rows = step_throughput(log_root)
    if rows:
        write_json(rows, f"{log_root}/throughput.json")
        print(format_throughput(rows), file=sys.stderr)


def on_error(workflow: Any, shards: dict[str, list[str]], slide_ids: list[str]) -> None:
    """Assemble the dataset from the shards that completed when the run's `assemble` job did not run."""
    jobs = unfinished_jobs(workflow)
    incomplete = incomplete_shards(jobs, shards)
    if any(job.rule.name == "assemble" for job in jobs) and len(incomplete) < len(shards):
        from pathgen.steps.assemble import assemble_dataset

        try:
            metrics = assemble_dataset("data/dataset", list(shards), incomplete)
        except PathgenError as exc:
            print(f"pathgen: the dataset of the completed shards could not be assembled: {exc}", file=sys.stderr)
        else:
            print(f"pathgen: data/dataset assembled from {len(shards) - len(incomplete)} of {len(shards)} shard(s): "
                  f"{metrics['pairs']} pairs (metrics.json: complete false)", file=sys.stderr)
    summary = run_summary(slide_ids, incomplete=incomplete)
    if summary:
        print(summary, file=sys.stderr)
