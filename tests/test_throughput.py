"""The model steps' throughput summary: summed job stats, kept out of the dataset."""

import json

from pathgen.lineage.run_end import on_success
from pathgen.reporting.throughput import format_throughput, step_throughput


def write_stats(root, step, shard, **stats):
    path = root / step / f"{shard}.stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "shard": shard, **stats}))


def test_step_throughput_sums_jobs_and_counts_loaded_models(tmp_path, monkeypatch):
    write_stats(tmp_path, "caption", "00000", items=30, hits=0, misses=30, loaded=True, seconds=10.0,
                generate_seconds=8.0, completion_tokens=800, truncated=3)
    write_stats(tmp_path, "caption", "00001", items=10, hits=10, misses=0, loaded=False, seconds=0.5,
                generate_seconds=0.0, completion_tokens=0, truncated=0)
    (tmp_path / "caption" / "00002.stats.json").write_text("{half-writ")  # a job writing right now
    rows = step_throughput(tmp_path)
    assert set(rows) == {"caption"}
    row = rows["caption"]
    assert (row["jobs"], row["jobs_loaded"], row["items"], row["hits"], row["truncated"]) == (2, 1, 40, 10, 3)
    assert row["items_per_s"] == round(40 / 10.5, 3)
    assert row["generated_tokens_per_s"] == 100.0
    assert "caption: 40 items in 2 jobs (1 loaded a model)" in format_throughput(rows)
    monkeypatch.chdir(tmp_path)
    on_success([], log_root=str(tmp_path))
    assert json.loads((tmp_path / "throughput.json").read_text()) == rows


def test_no_stats_no_file(tmp_path):
    assert step_throughput(tmp_path) == {}
    on_success([], log_root=str(tmp_path))
    assert not (tmp_path / "throughput.json").exists()
