"""File names inside the assembled dataset (`data/dataset/`), shared by assemble, the report and DVC."""

from __future__ import annotations

EXPORT_NAME = "pathgen-1.6m.json"  # the released PathGen-1.6M JSON format
METRICS_NAME = "metrics.json"
FAILURES_NAME = "failures.tsv"  # quarantined slides and incomplete shards: shard, slide_id, step, reason
# plots/<name>: (x column, y column), as DVC's plots read them
PLOTS = {"caption_tokens.csv": ("tokens", "count"), "pairs_per_tissue.csv": ("tissue", "pairs"),
         "clip_scores.csv": ("clip_score", "pairs")}  # clip_score: the start of a 0.02-wide bin, -1.00 .. 0.98
