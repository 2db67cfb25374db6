"""How fast the model steps ran: the shard jobs' stats (logs/{step}/{shard}.stats.json), per step.

Throughput depends on the machine and on what else ran, so it is kept out of
the dataset (whose bytes must not depend on either) and out of metrics.json:
`pathgen throughput` prints it, and a successful run writes it to
logs/throughput.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_STEPS = ("caption", "revise", "summarize")
SUMMED = ("items", "hits", "misses", "requests", "prompt_tokens", "completion_tokens", "truncated",
          "load_seconds", "generate_seconds", "seconds")


def step_throughput(log_root: str | Path = "logs") -> dict[str, dict[str, Any]]:
    """Per model step with stats: jobs, jobs that loaded their model, summed counters, items/s over the
    jobs' own time (sum of items / sum of seconds: what one job slot delivers) and tokens/s generated."""
    out: dict[str, dict[str, Any]] = {}
    for step in MODEL_STEPS:
        jobs = []
        for path in sorted(Path(log_root, step).glob("*.stats.json")):
            try:
                jobs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a job writing its stats right now, or an old unreadable file
        if not jobs:
            continue
        row: dict[str, Any] = {"jobs": len(jobs), "jobs_loaded": sum(bool(j.get("loaded")) for j in jobs)}
        for key in SUMMED:
            row[key] = round(sum(float(j.get(key) or 0) for j in jobs), 3)
        row["items_per_s"] = round(row["items"] / row["seconds"], 3) if row["seconds"] else None
        computed = row["generate_seconds"]
        row["generated_tokens_per_s"] = round(row["completion_tokens"] / computed, 1) if computed else None
        out[step] = row
    return out


def format_throughput(rows: dict[str, dict[str, Any]]) -> str:
    """One line per step."""
    if not rows:
        return "no model step has run (no logs/{caption,revise,summarize}/*.stats.json)"
    lines = []
    for step, r in rows.items():
        lines.append(f"{step}: {int(r['items'])} items in {r['jobs']} jobs ({r['jobs_loaded']} loaded a model), "
                     f"{r['items_per_s']} items/s, {int(r['hits'])} cache hits, {int(r['misses'])} misses, "
                     f"{int(r['truncated'])} answers cut at the token limit, "
                     f"{r['generated_tokens_per_s']} generated tokens/s")
    return "\n".join(lines)
