"""The model steps' shard jobs, run as the Snakemake rules run them, with servers (CPU, offline, tiny models).

Through servers, the same dataset: `pathgen caption` with engine openai against `transformers serve`
writes the descriptions, finish reasons and token counts of the in-process transformers engine;
`pathgen summarize` against llama.cpp's server the summaries of engine llama_cpp. Revise through
`transformers serve` (which cannot constrain) applies exactly its unconstrained answers. A job that
launches its own server leaves none behind; a job whose server is killed mid-shard fails with one
line naming the engine and URL, and its rerun resumes from the item cache. A fully cached shard job
never loads its model, even when the checkpoint's bytes have changed under an unchanged identity;
touching the checkpoint re-hashes it, so the fingerprint stays content-based.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import ROOT
from servers import OFFLINE, llama_server, stop, transformers_serve, wait_gone  # noqa: F401 (fixtures)
from pathgen.cli import main
from pathgen.steps.revise import apply_ops, ops_schema, parse_ops, revise_payload, revise_prompt
from pathgen.store.cache import ItemCache
from pathgen.store.io import encode_jpeg, write_parquet, write_tar
from pathgen.store.patch_tars import member_name, shard_patches
from pathgen.store.shards import pair_key

BIN = Path(sys.executable).parent
SHARD = "00000"
SECTION = {"caption": "describe", "revise": "revise", "summarize": "summarize"}  # each step's params
SLIDES = [{"slide_id": "S1", "tissue": "lung", "project": ""}, {"slide_id": "S2", "tissue": "colon", "project": ""}]
# `$0` is the pid file, `"$@"` the server's argv: the placeholders stay top-level words, quoted as they should be.
PID_WRAPPER = "bash -c 'echo $$ > \"$0\"; exec \"$@\"' {pidfile} "
LLAMA_SERVER = "{python} -m llama_cpp.server --model {checkpoint} --host {host} --port {port} --n_ctx 2048"
LLAMA_OPENAI = {"response_format": "json_object", "extra_body": {"repeat_penalty": 1.0}, "max_retries": 1,
                "timeout_s": 60, "startup_timeout_s": 120}


def job_argv(step: str, settings: dict, inputs: list[str], work: Path, name: str, cache: Path,
             flush_every: int = 32) -> list[str]:
    """`pathgen <step>`'s argv as rules/<step>.smk writes it (outputs and logs named `name` under `work`)."""
    return [step, "--shard", SHARD, *inputs, "--params-json", json.dumps({SECTION[step]: settings}),
            "--cache-dir", str(cache), "--flush-every", str(flush_every), "--threads", "2",
            "--out", str(work / f"{name}.parquet"), "--stats", str(work / f"{name}.stats.json"),
            "--log", str(work / f"{name}.log")]


def run_in_process(argv: list[str]) -> tuple[pl.DataFrame, dict]:
    """Run a job in this process (`pathgen.cli.main`); its table and stats. It must succeed."""
    code = main(argv)
    out, stats, log = (arg(argv, flag) for flag in ("--out", "--stats", "--log"))
    assert code == 0, log.read_text()
    return pl.read_parquet(out), json.loads(stats.read_text())


def run_job(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a job as its own process, as Snakemake does."""
    return subprocess.run([str(BIN / "pathgen"), *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **OFFLINE))


def arg(argv: list[str], flag: str) -> Path:
    """The path a job's argv gives after `flag` (--out, --stats, --log, --cache-dir)."""
    return Path(argv[argv.index(flag) + 1])


def stats_of(argv: list[str]) -> dict:
    return json.loads(arg(argv, "--stats").read_text())


def cached_items(cache: Path, agent: str) -> set[str]:
    """The distinct item keys in an agent's cache segments (one JSON line {"k", "v"} per item)."""
    keys = set()
    for segment in (cache / agent).glob("*/seg-*.jsonl"):
        keys.update(json.loads(line)["k"] for line in segment.read_text().splitlines() if line.strip())
    return keys


# --- fixtures: tiny models, one small shard, the steps' params ---------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pathgen.demo.tiny_models import build_tiny_gguf, build_tiny_llava

    root = tmp_path_factory.mktemp("models")
    return {"llava": build_tiny_llava(root / "tiny-llava"), "gguf": build_tiny_gguf(root / "tiny-llm.gguf")}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Two slides' patch tars, 4 demo-texture patches each (as `pathgen patches` names them); the --patches args."""
    from pathgen.demo.slides import texture_patches

    root = tmp_path_factory.mktemp("shard")
    images = [encode_jpeg(image, 90) for _, image in texture_patches(2, seed=0)][:8]
    tars = []
    for n, slide in enumerate(SLIDES):
        tar = root / f"{slide['slide_id']}.tar"
        write_tar({member_name(672 * i, 672 * n): images[4 * n + i] for i in range(4)}, tar)
        tars.append(str(tar))
    return {"tars": tars, "args": ["--slides-json", json.dumps(SLIDES), "--patches", *tars]}


@pytest.fixture(scope="module")
def params(models):
    """The describe, revise and summarize sections of params.yaml on the tiny models, with small budgets."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    describe = {**base["describe"], "checkpoint": str(models["llava"]), "max_new_tokens": 24, "device": "cpu"}
    # Few, short operations: a constrained answer of the random model closes well within max_new_tokens.
    revise = {**base["revise"], "checkpoint": str(models["llava"]), "max_new_tokens": 128, "device": "cpu",
              "max_ops": 2, "max_sentence_chars": 24}
    summarize = {**base["summarize"], "checkpoint": str(models["gguf"]), "max_tokens": 48}
    return {"describe": describe, "revise": revise, "summarize": summarize}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def local_captions(params, shard, work):
    """The in-process transformers engine's caption job: (table, stats, argv)."""
    argv = job_argv("caption", params["describe"], shard["args"], work, "captions-local", work / "cache-local")
    return (*run_in_process(argv), argv)


@pytest.fixture(scope="module")
def local_revised(params, shard, work, local_captions):
    argv = job_argv("revise", params["revise"], [*shard["args"], "--captions", str(arg(local_captions[2], "--out"))],
                    work, "revised-local", work / "cache-local")
    return (*run_in_process(argv), argv)


# --- the same dataset through servers ------------------------------------------------------------


def test_caption_through_transformers_serve_writes_the_in_process_descriptions(
        params, shard, work, local_captions, transformers_serve):
    url, name = transformers_serve
    local, local_stats, _ = local_captions
    settings = {**params["describe"], "engine": "openai",
                "openai": {"url": url, "model": name, "response_format": "none", "concurrency": 4}}
    served, stats = run_in_process(job_argv("caption", settings, shard["args"], work, "captions-served",
                                            work / "cache-served"))
    assert local.height == served.height == 8 and served["key"].to_list() == local["key"].to_list()
    columns = ["description", "describe_finish", "describe_tokens", "describe_prompt_tokens"]
    # Greedy on both sides, the same chat template, image processor and fp32 weights: the same tokens.
    assert served.select(columns).to_dicts() == local.select(columns).to_dicts()
    assert set(served["describe_engine"]) == {"openai"} and set(local["describe_engine"]) == {"transformers"}
    assert served["describe_fingerprint"][0] != local["describe_fingerprint"][0]  # engines keep apart in the cache
    assert all(served["description"])
    assert (stats["loaded"], stats["requests"], stats["misses"]) == (True, 8, 8)
    assert (local_stats["loaded"], local_stats["requests"], local_stats["misses"]) == (True, 8, 8)


def test_revise_through_transformers_serve_applies_exactly_its_unconstrained_answers(
        params, shard, work, local_captions, local_revised, transformers_serve):
    url, name = transformers_serve
    settings = {**params["revise"], "engine": "openai",
                "openai": {"url": url, "model": name, "response_format": "none", "concurrency": 4}}
    cache = work / "cache-served"
    inputs = [*shard["args"], "--captions", str(arg(local_captions[2], "--out"))]
    served, stats = run_in_process(job_argv("revise", settings, inputs, work, "revised-served", cache))
    local, local_stats, _ = local_revised
    # In process, every answer is decoded under its description's schema: all apply.
    assert local["revise_constrained"].to_list() == [True] * 8
    assert "invalid" not in set(local["revise_status"]) and local_stats["invalid"] == 0
    assert set(local["revise_engine"]) == {"transformers"}
    # The server cannot constrain: the schema is not sent, and what applies is what apply_ops makes of the answer.
    assert served["revise_constrained"].to_list() == [False] * 8 and set(served["revise_engine"]) == {"openai"}
    images = {p.key: p.image for p in shard_patches(shard["tars"], SLIDES)}
    answers = ItemCache(cache, "revise", served["revise_fingerprint"][0])
    for row in served.iter_rows(named=True):
        schema = ops_schema(row["description"], settings["max_ops"], settings["max_sentence_chars"])
        payload = revise_payload(revise_prompt(settings["prompt"], row["description"]), schema, images[row["key"]])
        answer = answers.get(payload)
        assert answer is not None and answer["constrained"] is False
        revised, status, applied = apply_ops(row["description"], parse_ops(answer["text"]))
        assert (row["revised"], row["revise_status"], json.loads(row["ops"])) == (revised, status, applied)
        if status == "invalid":
            assert row["revised"] == row["description"]  # kept as it was
        assert row["revise_finish"] == answer["finish"] and row["revise_tokens"] == answer["completion_tokens"]
    assert sum(stats[s] for s in ("applied", "unchanged", "invalid")) == 8
    assert stats["invalid"] == served["revise_status"].to_list().count("invalid")


def test_summarize_through_llama_cpp_server_writes_the_in_process_summaries(
        params, work, local_revised, llama_server):
    revised = ["--revised", str(arg(local_revised[2], "--out"))]
    local, local_stats = run_in_process(job_argv("summarize", params["summarize"], revised, work,
                                                 "summaries-local", work / "cache-local"))
    settings = {**params["summarize"], "engine": "openai", "openai": {"url": llama_server, **LLAMA_OPENAI}}
    served, stats = run_in_process(job_argv("summarize", settings, revised, work, "summaries-served",
                                            work / "cache-served"))
    assert served.height == local.height == 8
    assert served["summary"].to_list() == local["summary"].to_list()
    columns = ["key", "summary_tokens", "summary_cut", "summary_attempts", "summarize_finish"]
    assert served.select(columns).to_dicts() == local.select(columns).to_dicts()
    assert set(served["summarize_engine"]) == {"openai"} and set(local["summarize_engine"]) == {"llama_cpp"}
    assert stats["loaded"] and stats["requests"] == local_stats["requests"] >= 8


# --- launching, and losing, the server of a shard job ------------------------------------------


@pytest.fixture(scope="module")
def revised16(tmp_path_factory):
    """A revised table of 16 distinct descriptions (the columns summarize reads)."""
    path = tmp_path_factory.mktemp("revised16") / f"{SHARD}.parquet"
    rows = [{"key": pair_key(f"S{1 + i % 2}", 672 * i, 0), "slide_id": f"S{1 + i % 2}",
             "revised": f"Patch {i} shows {['lung', 'colon'][i % 2]} tissue with {i + 2} glands. "
                        f"Nuclei are enlarged in region {i}. The stroma is fibrotic and {i * 7} cells are seen."}
            for i in range(16)]
    write_parquet(pl.DataFrame(rows), path)
    return path


def launch_argv(params: dict, revised: Path, work: Path, name: str, flush_every: int = 2,
                **openai) -> tuple[list[str], Path]:
    """A summarize job whose server is launched by the job, through a wrapper writing its pid to a file."""
    pidfile = work / f"{name}.pid"
    template = PID_WRAPPER.replace("{pidfile}", shlex.quote(str(pidfile))) + LLAMA_SERVER
    settings = {**params["summarize"], "engine": "openai",
                "openai": {**LLAMA_OPENAI, "launch": template, **openai}}
    return job_argv("summarize", settings, ["--revised", str(revised)], work, name, work / f"{name}-cache",
                    flush_every=flush_every), pidfile


@pytest.fixture(scope="module")
def launched(params, revised16, work):
    """A summarize job that launches llama.cpp's server: (completed process, argv, server pid)."""
    argv, pidfile = launch_argv(params, revised16, work, "launched")
    proc = run_job(argv)
    return proc, argv, int(pidfile.read_text())


def test_a_job_that_launches_its_server_leaves_none_behind(launched, revised16):
    proc, argv, pid = launched
    assert proc.returncode == 0, proc.stderr
    assert wait_gone(pid, 5), f"the server (pid {pid}) outlived its job"
    table = pl.read_parquet(arg(argv, "--out"))
    assert table["key"].to_list() == sorted(pl.read_parquet(revised16)["key"])  # summarize sorts by key
    assert set(table["summarize_engine"]) == {"openai"} and all(table["summary"])
    stats = stats_of(argv)
    assert stats["loaded"] is True and stats["misses"] == stats["requests"] >= 16 and stats["hits"] == 0
    log_dir = arg(argv, "--log").parent / f"{SHARD}.server"
    assert (log_dir / "summarize-server.log").is_file()  # the launched server's log, beside the job's


def test_killing_the_server_mid_shard_fails_in_one_line_and_the_rerun_resumes(params, revised16, work, launched):
    argv, pidfile = launch_argv(params, revised16, work, "killed", concurrency=1)
    cache = arg(argv, "--cache-dir")
    job = subprocess.Popen([str(BIN / "pathgen"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, **OFFLINE))
    killed: dict = {}

    def kill_after_the_first_segment() -> None:
        deadline = time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline:
            if list((cache / "summarize").glob("*/seg-*.jsonl")):
                killed["items"] = len(cached_items(cache, "summarize"))
                killed["pid"] = int(pidfile.read_text())
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_after_the_first_segment)
    watcher.start()
    _, err = job.communicate(timeout=180)
    watcher.join()
    assert "pid" in killed, f"the job ended before a segment was written: {job.returncode}\n{err}"
    assert job.returncode == 2, f"the job did not fail when its server was killed:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("pathgen summarize: error: summarize: openai engine at http://127.0.0.1:"), err
    assert "the server it launched exited with code -9" in lines[-1], err
    assert "Traceback" not in err and "Traceback" not in arg(argv, "--log").read_text()
    assert not arg(argv, "--out").exists() and wait_gone(killed["pid"], 5)
    # What it had finished is in the cache: at least the segment seen, plus what the failing job flushed on exit.
    items = cached_items(cache, "summarize")
    assert 1 <= killed["items"] <= len(items)

    rerun = run_job(argv)
    assert rerun.returncode == 0, rerun.stderr
    stats = stats_of(argv)
    assert stats["hits"] == len(items) and stats["misses"] == stats["requests"] >= 1 and stats["loaded"] is True
    assert wait_gone(int(pidfile.read_text()), 5)
    # Resumed, the shard is what an uninterrupted job wrote.
    uninterrupted = pl.read_parquet(arg(launched[1], "--out"))
    resumed = pl.read_parquet(arg(argv, "--out"))
    assert resumed.drop("summarize_fingerprint").equals(uninterrupted.drop("summarize_fingerprint"))


# --- a fully cached shard job does not load its model ---------------------------------------------


def test_a_fully_cached_job_loads_no_model_and_the_fingerprint_stays_content_based(
        models, params, shard, tmp_path):
    checkpoint = tmp_path / "tiny-llava"
    shutil.copytree(models["llava"], checkpoint)
    settings = {**params["describe"], "checkpoint": str(checkpoint)}
    first = job_argv("caption", settings, shard["args"], tmp_path, "first", tmp_path / "cache")
    again = job_argv("caption", settings, shard["args"], tmp_path, "again", tmp_path / "cache")
    proc = run_job(first)
    assert proc.returncode == 0, proc.stderr
    assert stats_of(first)["loaded"] is True and stats_of(first)["misses"] == 8
    assert (tmp_path / "cache" / ".checkpoint-hashes").is_dir()

    # Garbage of the same size, written in place (same inode), with the old mtime: the same file identity.
    weights = checkpoint / "model.safetensors"
    st = os.stat(weights)
    with open(weights, "r+b") as f:
        f.write(os.urandom(st.st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_ino == st.st_ino
    proc = run_job(again)
    assert proc.returncode == 0, proc.stderr
    assert arg(again, "--out").read_bytes() == arg(first, "--out").read_bytes()
    stats = stats_of(again)
    assert (stats["loaded"], stats["misses"], stats["hits"], stats["requests"]) == (False, 0, 8, 0)

    # A new mtime: re-hashed, a new fingerprint, every item a miss, and the garbage must be loaded: it fails.
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = job_argv("caption", settings, shard["args"], tmp_path, "touched", tmp_path / "cache")
    proc = run_job(touched)
    assert proc.returncode != 0 and not arg(touched, "--out").exists() and not arg(touched, "--stats").exists()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pathgen caption: error: cannot load describe checkpoint {checkpoint} as LLaVA: ")
