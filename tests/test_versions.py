"""Snakemake builds, DVC versions: generated dvc.yaml, audit, version diffs, checkout + sync.

One temporary git + DVC repository holds the small demo: version 1 is built
with Snakemake and recorded with `dvc commit`; version 2 changes a select
param. The tests run in file order and share that repository.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import BIN, ROOT, planned_jobs, run, snakemake

from pathgen.lineage.dvc_yaml import stale_lock_stages
from pathgen.lineage.diff import word_change
from pathgen.lineage.versioning import judge_diff, lock_differences

INPUTS = ["data/demo", "data/slides.tsv", "models/tiny-clip", "models/tiny-llava", "models/tiny-llm"]


def dvc(repo: Path, *args: str, check: bool = True):
    return run([str(BIN / "dvc"), *args], repo, check=check)


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout.strip()


def pathgen(repo: Path, *args: str, check: bool = True):
    return run([str(BIN / "pathgen"), *args], repo, check=check)


@pytest.fixture(scope="module")
def repo(demo_inputs, tmp_path_factory):
    """The small demo as a git + DVC repo whose inputs and models are DVC-tracked; its own code runs it."""
    root = tmp_path_factory.mktemp("versions") / "repo"
    shutil.copytree(demo_inputs, root, symlinks=True)
    shutil.copytree(ROOT / "pathgen", root / "pathgen", ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".dvcignore", "dvc.yaml", "data/.gitignore", "models/.gitignore"):
        shutil.copy2(ROOT / name, root / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(root))  # the repo's pathgen, so code edits there are what runs
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.email", "test@example.org")
        git(root, "config", "user.name", "test")
        dvc(root, "init", "-q")
        dvc(root, "config", "core.analytics", "false")
        dvc(root, "add", "-q", *INPUTS)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "inputs and models")
        yield root


def test_dvc_yaml_is_generated_from_the_snakefile(repo):
    """The committed dvc.yaml is what `pathgen dvc-yaml` makes of the Snakefile; a stale one fails --check."""
    assert pathgen(repo, "dvc-yaml", "--check").returncode == 0
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    assert list(stages) == ["embed", "select", "caption", "revise", "summarize", "assemble", "report"]
    assert stages["select"]["cmd"] == "snakemake --until select"
    assert stages["assemble"]["cmd"] == "snakemake --until assemble"  # assemble_shard runs as its dependency
    assert {"data/demo", "data/embeddings", "data/tiles", "models/tiny-clip", "pathgen/steps/select.py",
            "pathgen/steps/prompts.py", "pathgen/steps/patches.py", "rules/select.smk"} <= set(stages["select"]["deps"])
    assert "pathgen/steps/select.py" not in stages["caption"]["deps"]
    assert stages["select"]["params"] == ["manifest", "prompts", "seed", "clip", "select", "patches"]
    assert stages["select"]["outs"] == [{d: {"persist": True}} for d in ("data/patches", "data/prompts", "data/selection")]
    assert stages["caption"]["outs"] == [{"data/captions": {"persist": True}}]
    assert pipeline["metrics"] == ["data/dataset/metrics.json"]

    stale = repo / "stale"
    shutil.copytree(repo, stale, ignore=shutil.ignore_patterns(".git", ".dvc", "models", "data"), symlinks=True)
    for name in ("models", "data"):
        (stale / name).symlink_to(repo / name)
    rule = stale / "rules/summarize.smk"  # summarize starts reading the captions: a new dep of its stage
    rule.write_text(rule.read_text().replace("    input:\n", '    input:\n        c="data/captions/{shard}.parquet",\n', 1))
    proc = pathgen(stale, "dvc-yaml", "--check", "--root", ".", check=False)
    assert proc.returncode == 2
    assert "dvc.yaml is stale" in proc.stderr and "+    - data/captions\n" in proc.stderr
    assert "Building DAG" not in proc.stderr
    shutil.rmtree(stale)


def test_build_commit_and_audit(repo):
    """Build with Snakemake, record with `dvc commit`; `pathgen audit` rebuilds it from the inputs alone."""
    snakemake(repo)
    dvc(repo, "commit", "-f", "-q")
    assert dvc(repo, "status").stdout.strip().startswith("Data and pipelines are up to date")
    git(repo, "add", "dvc.lock")
    git(repo, "commit", "-q", "-m", "version 1")
    shutil.copy2(repo / "data/dataset/manifest.parquet", repo.parent / "v1-manifest.parquet")

    proc = pathgen(repo, "audit", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = "pathgen audit --mode exact: HEAD"
    items = int(re.search(rf"{head}: item cache \S+: \d+ segments, (\d+) items checked against their content "
                          r"hashes, 0 problem\(s\)", proc.stdout).group(1))
    assert items > 0
    # every model answer came from the verified cache, and every other step ran again to the same bytes
    assert (f"{head}: dvc repro from the tracked inputs rebuilt 7 stages with model answers from the item cache; "
            "0 model answers computed\n" f"{head}: dvc.lock is byte-identical\n{head}: passed") in proc.stdout
    assert git(repo, "status", "--porcelain") == ""  # the audit built elsewhere

    # recompute: an empty cache, every model call made again; on the CPU they give the same pairs
    proc = pathgen(repo, "audit", "--mode", "recompute", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = "pathgen audit --mode recompute: HEAD"
    computed = int(re.search(rf"{head}: .* every model call was made again; (\d+) model answers computed",
                             proc.stdout).group(1))
    assert computed >= items  # at least every answer the exact audit was served
    pairs = pl.read_parquet(repo / "data/dataset/manifest.parquet").height
    assert (f"{head}: dataset diff, committed -> rebuilt: {pairs} -> {pairs} pairs; added 0, removed 0, caption "
            f"changed 0 (mean 0.0% of their words, at most 0.0%), image changed 0, unchanged {pairs}; tolerance "
            f"1.00% of the pairs\n{head}: passed") in proc.stdout
    assert f"{head}: dvc.lock is byte-identical" in proc.stdout

    # A damaged cache entry fails the exact audit before anything is rebuilt, naming the segment.
    segment = sorted((repo / "cache" / "describe").glob("*/seg-*.jsonl"))[0]
    original = segment.read_bytes()
    segment.write_bytes(original[:40] + bytes([original[40] ^ 1]) + original[41:])  # one bit of a key
    try:
        proc = pathgen(repo, "audit", check=False)
    finally:
        segment.write_bytes(original)
    assert proc.returncode == 1
    assert f"item cache: describe/{segment.parent.name}/{segment.name}: its bytes do not hash to its name" in proc.stderr
    assert "dvc repro" not in proc.stderr and "FAILED" in proc.stderr


def test_dvc_yaml_warns_of_stages_left_in_dvc_lock(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"embed": {"cmd": "x"}}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"embed": {}, "tile": {}}}))
    assert stale_lock_stages(tmp_path) == ["tile"]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"embed": {}}}))
    assert stale_lock_stages(tmp_path) == []


def test_lock_differences_names_each_moved_output():
    committed = yaml.safe_dump({"schema": "2.0", "stages": {
        "select": {"outs": [{"path": "data/selection", "md5": "a.dir"}]},
        "patches": {"outs": [{"path": "data/patches", "md5": "b.dir"}]}}})
    rebuilt = committed.replace("b.dir", "c.dir")
    assert lock_differences(committed, committed) == []
    assert lock_differences(committed, rebuilt) == ["patches: data/patches: committed b.dir, rebuilt c.dir"]


def diff_report(pairs: int, added=(), removed=(), caption_changed=(), image_changed=()) -> dict:
    keys = {"added": list(added), "removed": list(removed), "caption_changed": list(caption_changed),
            "image_changed": list(image_changed)}
    return {"counts": {"pairs_a": pairs, **{k: len(v) for k, v in keys.items()}}, "keys": keys}


def test_recompute_verdict_holds_changed_pairs_to_the_tolerance_and_images_to_none():
    assert judge_diff(diff_report(200), 0.0) == []
    # 2 of 200 pairs changed (one re-captioned twice over is one pair): 1% passes, 0.5% fails
    report = diff_report(200, added=["k9"], caption_changed=["k1"], removed=[])
    assert judge_diff(report, 0.01) == []
    assert judge_diff(report, 0.005) == ["2 of 200 pairs changed (added, removed or re-captioned), more than the "
                                         "tolerance of 0.50% (1 pairs)"]
    assert judge_diff(diff_report(200, removed=["k1"], caption_changed=["k1"]), 0.005) == []  # one pair
    # a patch image never changes when only the models were rerun, whatever the tolerance
    assert judge_diff(diff_report(200, image_changed=["k3"]), 1.0) == [
        "1 pair(s) have another patch image: images come from deterministic steps, so a model rerun never changes one"]


def test_word_change_is_the_share_of_differing_words():
    assert word_change("a b c d", "a b c d") == 0.0
    assert word_change("a b c d", "a b x d") == 0.25
    assert word_change("", "new words") == 1.0 and word_change(None, None) == 0.0


def test_code_change_reruns_its_step_in_both_engines(repo):
    """Editing pathgen/steps/select.py is a change of the select stage for DVC and of the select rule for Snakemake."""
    module = repo / "pathgen/steps/select.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        assert set(json.loads(dvc(repo, "status", "--json").stdout)) == {"select"}
        dry = snakemake(repo, "-n").stdout
        assert "Rules with provenance triggered jobs: select\n" in dry
    finally:
        module.write_text(original)
    assert planned_jobs(repo) == {}


def test_second_version_and_diffs(repo):
    """v2 changes a select param: only `select` is stale for DVC; `pathgen diff` and `dvc metrics diff` see it."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["select"]["similarity_threshold"] = 0.9
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(repo, "status", "--json").stdout)) == {"select"}
    snakemake(repo)
    dvc(repo, "commit", "-f", "-q")
    git(repo, "commit", "-q", "-am", "version 2: select.similarity_threshold 0.9")

    v1 = pl.read_parquet(repo.parent / "v1-manifest.parquet")
    v2 = pl.read_parquet(repo / "data/dataset/manifest.parquet")
    keys1, keys2 = set(v1["key"]), set(v2["key"])
    assert keys1 != keys2
    report = json.loads(pathgen(repo, "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert report["keys"]["added"] == sorted(keys2 - keys1)
    assert report["keys"]["removed"] == sorted(keys1 - keys2)
    counts = report["counts"]
    assert counts["added"] == len(keys2 - keys1)
    assert counts["removed"] == len(keys1 - keys2)
    both = v1.join(v2, on="key", suffix="_2")
    same = both.filter((pl.col("summary") == pl.col("summary_2")) & (pl.col("image_sha256") == pl.col("image_sha256_2")))
    assert counts["unchanged"] == same.height

    metrics = json.loads(dvc(repo, "metrics", "diff", "HEAD~1", "HEAD", "--json").stdout)
    pairs = metrics["data/dataset/metrics.json"]["pairs"]
    assert (pairs["old"], pairs["new"]) == (v1.height, v2.height)
    plots = dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "--json", "--split").stdout
    assert "data/dataset/plots/caption_tokens.csv" in plots


def test_checkout_and_sync_plan_nothing(repo):
    """Old version checked out with DVC, synced: Snakemake plans nothing; back to the new one, the same."""
    v2_manifest = (repo / "data/dataset/manifest.parquet").read_bytes()
    git(repo, "checkout", "-q", "HEAD~1")
    dvc(repo, "checkout", "-q")
    assert (repo / "data/dataset/manifest.parquet").read_bytes() == (repo.parent / "v1-manifest.parquet").read_bytes()
    out = pathgen(repo, "sync").stdout
    assert "dvc status is clean" in out
    assert planned_jobs(repo) == {}

    git(repo, "checkout", "-q", "main")
    dvc(repo, "checkout", "-q")
    assert (repo / "data/dataset/manifest.parquet").read_bytes() == v2_manifest
    pathgen(repo, "sync")
    assert planned_jobs(repo) == {}


def test_sync_refuses_a_workspace_that_differs_from_dvc_lock(repo):
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("similarity_threshold: 0.9", "similarity_threshold: 0.95"))
    try:
        proc = pathgen(repo, "sync", check=False)
        assert proc.returncode == 2
        assert "does not match dvc.lock" in proc.stderr and "select" in proc.stderr
    finally:
        params.write_text(original)
