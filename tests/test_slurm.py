"""Snakemake on a real (single-node, localhost) SLURM cluster: scripts/slurm-local starts it.

The cluster's job completion log (jobcomp/filetxt) is the proof of what SLURM really ran: one line per
finished job with its id, name and final state. Skipped only where SLURM cannot be installed here
(no apt-get, no root or passwordless sudo, no Debian package source): scripts/slurm-local exits 3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "scripts" / "slurm-local"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
UNABLE = 3  # scripts/slurm-local's exit status for "impossible on this machine"


@dataclass
class SlurmCluster:
    dir: Path
    jobcomp: Path

    def jobs(self) -> dict[str, dict[str, str]]:
        """Job id -> {JobId, Name, JobState, ...} from the completion log (the last record per id wins)."""
        records = {}
        text = self.jobcomp.read_text() if self.jobcomp.exists() else ""
        for line in text.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                records[fields["JobId"]] = fields
        return records

    def wait_for_record(self, jobid: str, timeout: float = 10) -> dict[str, str]:
        """slurmctld writes the record when the job ends; give it a moment."""
        deadline = time.monotonic() + timeout
        while (rec := self.jobs().get(jobid)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rec is not None, f"no jobcomp record for job {jobid}:\n{self.jobcomp.read_text()}"
        return rec


def _slurm_local(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM_LOCAL), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    proc = _slurm_local("install")
    if proc.returncode == UNABLE:
        pytest.skip(f"SLURM cannot be installed on this machine: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"slurm-local install failed ({proc.returncode}):\n{proc.stderr}"
    cluster_dir = tmp_path_factory.mktemp("slurm")
    proc = _slurm_local("start", str(cluster_dir), timeout=120)
    if proc.returncode == UNABLE:  # installed, but no root or sudo to run it
        pytest.skip(f"cannot start SLURM here: {proc.stderr.strip().splitlines()[-1]}")
    try:
        assert proc.returncode == 0, f"slurm-local start failed ({proc.returncode}):\n{proc.stderr}"
        yield SlurmCluster(dir=cluster_dir, jobcomp=cluster_dir / "jobcomp.log")
    finally:
        stop = _slurm_local("stop", str(cluster_dir), timeout=120)
        assert stop.returncode == 0, f"slurm-local stop failed:\n{stop.stderr}"


def test_sbatch_job_is_recorded_completed(slurm_cluster, tmp_path):
    out = tmp_path / "hello.txt"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--job-name", "hello", "--output", str(out),
         "--wrap", "echo hello from $SLURM_JOB_ID"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    jobid = proc.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from {jobid}"
    rec = slurm_cluster.wait_for_record(jobid)
    assert (rec["Name"], rec["JobState"], rec["ExitCode"]) == ("hello", "COMPLETED", "0:0")


SNAKEFILE = """
rule all:
    input: "out/final.txt"

rule quick:
    output: "out/quick.txt"
    shell: "echo quick $SLURM_JOB_ID > {output}"

rule slow:
    output: "out/slow.txt"
    resources: tries=lambda wildcards, attempt: attempt
    shell: "sleep 20; echo slow attempt {resources.tries} $SLURM_JOB_ID > {output}"

rule final:
    input: "out/quick.txt", "out/slow.txt"
    output: "out/final.txt"
    shell: "cat {input} > {output}; echo final $SLURM_JOB_ID >> {output}"
"""

# How the SLURM plugin (2.8.0) must be run on a cluster without slurmdbd. It polls
# `squeue --states=all --name <run id>`; the first poll comes right away, the next after
# --seconds-between-status-checks, then each poll without a finished job waits 10 s longer (up to
# 180 s), and a finished job resets the wait to --slurm-init-seconds-before-status-checks.
SLURM_ARGS = [
    "--executor", "slurm", "--jobs", "2", "--latency-wait", "5",
    "--slurm-status-command", "squeue",  # sacct only answers with slurmdbd
    "--seconds-between-status-checks", "1",
    "--slurm-init-seconds-before-status-checks", "1",  # also keeps 3 x it below MinJobAge: no sacct fallback
    "--slurm-keep-successful-logs",  # .snakemake/slurm_logs/rule_<name>/<jobid>.log maps jobs to rules
    "--default-resources", "mem_mb=200", "runtime=10",
]


def _squeue() -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def _squeue_steps(jobid: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-s", "-j", jobid, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def run_and_cancel(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path,
                   pick: Callable[[], str | None], wait: float) -> tuple[int, str]:
    """Run Snakemake; scancel the first SLURM job `pick` names (polled while it runs); (exit status, job id)."""
    cancelled = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait
            while cancelled is None and time.monotonic() < deadline and proc.poll() is None:
                if (jobid := pick()) is not None:
                    subprocess.run(["scancel", jobid], check=True)
                    cancelled = jobid
                time.sleep(0.2)
            assert cancelled, f"no job to cancel was seen running:\n{log_path.read_text()}"
            rc = proc.wait(timeout=wait)
        finally:
            if proc.poll() is None:
                proc.kill()  # SIGTERM only makes Snakemake wait for its jobs
                proc.wait()
    return rc, cancelled


def _slurm_jobs_by_rule(workdir: Path) -> dict[str, set[str]]:
    logs = workdir / ".snakemake" / "slurm_logs"
    return {d.name.removeprefix("rule_"): {p.stem for p in d.glob("*.log")} for d in logs.glob("rule_*")}


@pytest.mark.workflow
def test_snakemake_on_slurm_retries_a_cancelled_job(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEMAKE_PROFILE", "SLURM_"))}
    log_path = tmp_path / "snakemake.log"

    def slow_job_running() -> str | None:
        # Cancel the first attempt of `slow` once it runs (the plugin's --comment is rule_<name>), and
        # once the job's step (the inner srun running the shell command) has started and settled: a
        # scancel racing the step's start can miss the new process (proctrack/linuxproc), leaving the job
        # COMPLETING until `sleep` ends, which only slows detection.
        running = [jobid for jobid, comment, state in _squeue() if comment == "rule_slow" and state == "RUNNING"]
        if running and f"{running[0]}.0" in _squeue_steps(running[0]):
            time.sleep(2)
            return running[0]
        return None

    rc, cancelled = run_and_cancel([str(SNAKEMAKE), *SLURM_ARGS, "--retries", "1"], tmp_path, env, log_path,
                                   slow_job_running, wait=150)
    log_text = log_path.read_text()
    assert rc == 0, log_text

    run_id = re.search(r"SLURM run ID: (\S+)", log_text).group(1)
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in log_text, log_text
    assert "Trying to restart job" in log_text, log_text

    by_rule = _slurm_jobs_by_rule(tmp_path)
    assert set(by_rule) == {"quick", "slow", "final"}, by_rule  # `all` is local
    assert len(by_rule["quick"]) == len(by_rule["final"]) == 1 and len(by_rule["slow"]) == 2, by_rule
    assert cancelled in by_rule["slow"]
    (quick,), (final,), (retried,) = by_rule["quick"], by_rule["final"], by_rule["slow"] - {cancelled}

    jobs = slurm_cluster.jobs()
    for jobid in (quick, final, retried, cancelled):
        assert jobs[jobid]["Name"] == run_id, jobs[jobid]
    assert jobs[cancelled]["JobState"] == "CANCELLED"
    assert [jobs[j]["JobState"] for j in (quick, retried, final)] == ["COMPLETED"] * 3

    # The outputs were written by those SLURM jobs, the slow one by its second attempt.
    assert (tmp_path / "out" / "final.txt").read_text().splitlines() == [
        f"quick {quick}", f"slow attempt 2 {retried}", f"final {final}"]


# The demo through the project's own cluster profile ---------------------------------------------

def slurm_test_profile(dest: Path) -> Path:
    """profiles/slurm/config.yaml filled in as a user would for this cluster: no account, its `debug`
    partition, no GPUs (the node has none: `gpu: 0` for the steps that ask for one), the demo's own
    threads and memory (the profile's are for the real checkpoints); plus fast status polls and kept
    SLURM logs."""
    import yaml

    config = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    defaults = config["default-resources"]
    defaults.pop("slurm_account")
    defaults["slurm_partition"] = "debug"
    assert config.pop("resources") == {"gpu": 1} and config.pop("set-resource-scopes") == {"gpu": "local"}
    config.pop("set-threads")
    gpu_rules = {rule for rule, res in config.pop("set-resources").items()
                 if res.get("slurm_partition") == "YOUR_GPU_PARTITION"}
    assert gpu_rules == {"embed", "select", "caption", "revise", "summarize"}  # a real cluster's GPU steps
    config["set-resources"] = {rule: {"gpu": 0} for rule in sorted(gpu_rules)}
    config.update({"jobs": 4, "latency-wait": 5, "seconds-between-status-checks": 1,
                   "slurm-init-seconds-before-status-checks": 1, "slurm-keep-successful-logs": True})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _slurm_jobs(root: Path) -> dict[str, str]:
    """SLURM job id -> what it ran (`rule_caption/00000`, `group_slides_embed_select`), from the kept logs."""
    logs = root / "logs" / "slurm"
    return {p.stem: p.parent.relative_to(logs).as_posix() for p in logs.rglob("*.log")}


@dataclass
class SlurmBuild:
    root: Path
    log: str
    cancelled: str  # the SLURM job id of the caption job cancelled mid-run
    cancelled_shard: str


@pytest.fixture(scope="module")
def slurm_build(slurm_cluster, demo_inputs, tmp_path_factory) -> SlurmBuild:
    """The demo built with `snakemake --profile <the slurm profile>`; the first caption job that has
    flushed items to the cache is cancelled with scancel while it runs."""
    root = tmp_path_factory.mktemp("slurm-demo") / "project"
    shutil.copytree(demo_inputs, root, symlinks=True)
    profile = slurm_test_profile(root.parent / "profile")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEMAKE_PROFILE", "SLURM_"))}
    env["PATH"] = f"{SNAKEMAKE.parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run `pathgen` from the venv
    log_path = root.parent / "snakemake.log"

    def caption_job_with_flushed_items() -> str | None:
        running = [j for j, comment, state in _squeue() if comment.startswith("rule_caption") and state == "RUNNING"]
        flushed = list((root / "cache").glob("describe/*/seg-*"))
        return running[0] if running and flushed else None  # mid-shard: some items cached, others not yet

    rc, cancelled = run_and_cancel([str(SNAKEMAKE), "--profile", str(profile)], root, env, log_path,
                                   caption_job_with_flushed_items, wait=900)
    text = log_path.read_text()
    assert rc == 0, text
    shard = _slurm_jobs(root)[cancelled].rsplit("/", 1)[-1]
    return SlurmBuild(root, text, cancelled, shard)


def _dataset_files(root: Path) -> dict[str, bytes]:
    files = {}
    for name in ("captions", "revised", "summaries", "dataset", "selection", "patches", "tiles"):
        for path in sorted((root / "data" / name).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


@pytest.mark.workflow
def test_demo_through_slurm_matches_the_local_build(slurm_build, built_demo, slurm_cluster):
    """Every job went through sbatch (grouped slide jobs, one job per shard step) and the bytes match."""
    root = slurm_build.root
    jobs = _slurm_jobs(root)
    ran = sorted(jobs.values())
    # the 3 slides' embed + select jobs in one SLURM job; shard jobs one each; `all` stays local
    assert ran.count("group_slides_embed_select") == 1
    for rule in ("revise", "summarize", "assemble_shard"):
        assert sorted(r for r in ran if r.startswith(f"rule_{rule}/")) == [f"rule_{rule}/00000", f"rule_{rule}/00001"]
    assert ran.count("rule_assemble") == ran.count("rule_report_pages") == 1
    run_id = re.search(r"SLURM run ID: (\S+)", slurm_build.log).group(1)
    records = slurm_cluster.jobs()
    for jobid in jobs:
        record = slurm_cluster.wait_for_record(jobid)
        assert record["Name"] == run_id
        assert record["JobState"] == ("CANCELLED" if jobid == slurm_build.cancelled else "COMPLETED"), record
    assert set(jobs) <= set(records) | set(slurm_cluster.jobs())

    local, remote = _dataset_files(built_demo), _dataset_files(root)
    assert sorted(remote) == sorted(local)
    assert [k for k in local if local[k] != remote[k]] == []


@pytest.mark.workflow
def test_cancelled_shard_job_is_retried_and_resumes_from_the_cache(slurm_build, built_demo):
    """scancel on a running caption job: Snakemake sees CANCELLED, resubmits, the retry reuses the items
    the cancelled job had flushed, and the shard's captions equal the local build's."""
    assert f"SLURM-job '{slurm_build.cancelled}' failed, SLURM status is: 'CANCELLED'" in slurm_build.log
    assert "Trying to restart job" in slurm_build.log
    shard = slurm_build.cancelled_shard
    attempts = [j for j, what in _slurm_jobs(slurm_build.root).items() if what == f"rule_caption/{shard}"]
    assert slurm_build.cancelled in attempts and len(attempts) == 2
    stats = json.loads((slurm_build.root / f"logs/caption/{shard}.stats.json").read_text())
    assert stats["hits"] >= 1  # the retry resumed: what the cancelled attempt flushed was not recomputed
    assert stats["hits"] + stats["misses"] == pl.read_parquet(built_demo / f"data/captions/{shard}.parquet").height
    rel = f"data/captions/{shard}.parquet"
    assert (slurm_build.root / rel).read_bytes() == (built_demo / rel).read_bytes()
