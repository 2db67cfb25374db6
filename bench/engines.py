"""Model-step throughput per engine on one shard: describe (the caption step), revise, summarize.

    python bench/engines.py [--params params.yaml] [--shard 00000] [--limit 32] [--repeat 3] [--threads 1]
                            [--agents describe,revise,summarize] [--engines transformers,llama_cpp,openai]
                            [--concurrency 1,4,16,64]

Engines per agent (--engines picks among them; default: the ones marked *):
  describe   transformers* (in-process LLaVA)     openai* against `transformers serve <tiny LLaVA>`
  revise     transformers* (in-process, schema-constrained)
             openai against `transformers serve` (it cannot constrain: schemas are not sent, so the
             answers, and the work, differ from the constrained engine's)
  summarize  llama_cpp* (in-process GGUF)         openai* against `python -m llama_cpp.server <tiny GGUF>`
The openai engine launches its server itself (the agent's `openai.launch`, so launch mode is what is
measured), on 127.0.0.1 with the same --threads, greedy, llama.cpp's with `extra_body: {repeat_penalty:
1.0}` so its answers equal the in-process engine's. Where params.yaml already sets an agent's engine to
openai, its own `openai:` mapping (a URL or a launch template) is used instead.

Works on the first --limit items of the shard in key order, the order the steps use (0: all); a limited
shard is written to a temporary directory (patch tars, captions or revised Parquet holding only those
items), so a step reads what a shard of that size would hold. Prints the shard, threads, then one line per
agent and engine (model, device, batch size or concurrency, generation length; for openai the server
command and whether that server batches), then per agent and engine:
  load       seconds to build the agent and its engine, once: checkpoint fingerprint, weights (openai:
             launching the server and waiting until it answers); summarize also loads the CLIP tokenizer
             that counts caption tokens
  bare       items/s of the bare engine call: agent.generate on the step's requests, engine loaded, no
             cache (transformers: in the step's batch size; openai: `concurrency` in flight; summarize:
             only the time inside agent.generate, for the rounds of prompts the step sends, retries
             included)
  cold       items/s of the step function (run_caption, run_revise, run_summarize) into a fresh cache dir
  warm       items/s of the same step again on that cache dir (every item a hit: no model call)
  warm/cold  the cache's speed-up on a rerun
  overhead   step time (cold) / bare time: 1.00 means the job costs nothing beyond the model calls; the
             rest is reading tars, hashing payloads and the checkpoint's fingerprint, the item cache,
             token counting, writing Parquet. Target: the step at >= 0.9 x the bare engine's throughput,
             overhead <= 1.11: PASS or FAIL
  spread     the slowest bare or cold run's time over the fastest's (--repeat > 1): how much other work on
             the machine moved the figures; a verdict within that margin of 1.11 says little
  cpu        the same ratio in CPU time (this process, plus the server's for a server the bench launched):
             near overhead when the extra time is work done on this machine, below it when the step waits
  calls      model requests of the cold run (summarize: retries included)
  tokens     completion tokens of the cold run (what the engine generated: compare engines on it)
  same       items whose output (description, revised text, summary) equals the agent's first engine's
  cache      cold misses / warm hits
and, for the openai engine, a concurrency sweep (--concurrency): items/s of the bare call with that many
requests in flight (a client of the same launched server, reached by URL) and the ratio to the smallest
concurrency's (1 by default). A ratio near 1 means the server answers one request at a time whatever is in
flight; above 1, it batches (or overlaps request handling with generation). llama.cpp's server is started
with --n_parallel/--parallel (the sweep's largest concurrency) where its --help lists such an option.

The steps run with the agent already loaded: the `Agent` class the step module imports is swapped for a
factory that checks the step asks for the same agent (what, settings), computes the fingerprint as
Agent() does (so that cost stays in the step), resets the agent's stats and hands the loaded agent over,
its `with` block leaving it open. So load is left out of cold, warm and bare and reported apart. One
untimed call per agent warms the engine up first. With --repeat N every figure but load is the best of N
runs (bare, cold, warm and the sweep interleaved, bare before the step on even runs and after it on
odd ones): on a shared machine other work only ever adds time, and medians of 3 still moved by 20%.
revise's warm-up sends every request once: the transformers engine keeps the grammar it compiles per
schema, so every timed run, bare or step, finds them compiled (a real job compiles each description's
once; here a few percent of the bare time).
--threads goes to torch, llama.cpp and the launched servers (OMP_NUM_THREADS; --n_threads); the rules
give model jobs 2, but the default is 1: on a 2-core machine with other work running, 2 torch threads
made a batch-8 generate of the tiny LLaVA take anywhere from 0.27 s to 2.2 s (OpenMP threads spin
waiting for each other), 1 thread a steady 0.27 s; llama-cpp-python's default, every core, made 70
summarize calls take 3.5 s to 16.6 s here, against a steady 1.3 s.
Run from the project root after `make demo` (needs data/patches/, data/captions/, data/revised/ and
models/); caches, outputs and server logs go to a temporary directory, nothing under the project is
written.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pathgen.steps.caption as caption_mod  # noqa: E402
import pathgen.steps.revise as revise_mod  # noqa: E402
import pathgen.steps.summarize as summarize_mod  # noqa: E402
from pathgen.config import validate_params  # noqa: E402
from pathgen.models.device import resolve_device  # noqa: E402
from pathgen.models.engine import Agent, EngineStats, Request, agent_fingerprint  # noqa: E402
from pathgen.models.openai_engine import DEFAULTS as OPENAI_DEFAULTS  # noqa: E402
from pathgen.steps.caption import describe_prompt, run_caption  # noqa: E402
from pathgen.steps.revise import ops_schema, revise_prompt, run_revise  # noqa: E402
from pathgen.steps.summarize import run_summarize, summarize_all  # noqa: E402
from pathgen.store.io import read_tar, write_tar  # noqa: E402
from pathgen.store.manifest import read_manifest  # noqa: E402
from pathgen.store.patch_tars import MEMBER, shard_patches  # noqa: E402
from pathgen.store.shards import pair_key, shard_slides  # noqa: E402
from pathgen.text.tokens import clip_token_counter  # noqa: E402

AGENTS = ("describe", "revise", "summarize")
SECTIONS = ("manifest", "shards", "cache", *AGENTS)  # what this bench reads of params.yaml
IN_PROCESS = {"describe": "transformers", "revise": "transformers", "summarize": "llama_cpp"}
SUPPORTED = {what: (engine, "openai") for what, engine in IN_PROCESS.items()}
DEFAULT_ENGINES = {"describe": ("transformers", "openai"), "revise": ("transformers",),
                   "summarize": ("llama_cpp", "openai")}
OUTPUT_COLUMN = {"describe": "description", "revise": "revised", "summarize": "summary"}
TARGET = 0.9  # the step at >= this fraction of the bare engine's throughput
BIN = Path(sys.executable).parent
MODULES = {"describe": caption_mod, "revise": revise_mod, "summarize": summarize_mod}

Times = tuple[float, float]  # (wall seconds, CPU seconds: this process + a launched server)


def load_sections(path: str) -> dict[str, Any]:
    """The params.yaml sections this bench uses, validated as a step validates its own view."""
    params = yaml.safe_load(Path(path).read_text())
    view = {key: params[key] for key in SECTIONS if key in params}
    validate_params(view, path, sections=SECTIONS)
    return view


# --- timing -----------------------------------------------------------------------------------


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of process `pid` so far, 0 when there is none."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any], server_pid: int | None = None) -> tuple[Times, Any]:
    wall, cpu, server = time.perf_counter(), time.process_time(), process_cpu(server_pid)
    result = fn()
    return (time.perf_counter() - wall,
            time.process_time() - cpu + process_cpu(server_pid) - server), result


def best(runs: list[Times]) -> Times:
    return min(t[0] for t in runs), min(t[1] for t in runs)


def spread(runs: list[Times]) -> float:
    """Slowest run's wall time over the fastest's."""
    return max(t[0] for t in runs) / min(t[0] for t in runs)


# --- the loaded agent, lent to a step ---------------------------------------------------------


class Lent:
    """The loaded agent as a step sees it: everything delegated, but leaving the step's `with` keeps it open."""

    def __init__(self, agent: Agent):
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    def __enter__(self) -> Lent:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None  # the bench closes the agent when it is done with it


@contextmanager
def lent_to(module: Any, agent: Agent) -> Iterator[None]:
    """Make `module.Agent(...)`, the agent a step constructs, hand over the loaded `agent`."""
    original = module.Agent

    def factory(what: str, settings: dict[str, Any], threads: int | None = None,
                log_dir: str | Path | None = None, hash_store: str | Path | None = None) -> Lent:
        if what != agent.what or settings != agent.settings:
            raise RuntimeError(f"the {what} step asked for another agent than the one the bench loaded")
        # What Agent() does before any model call: the fingerprint, checkpoint hashes from the job's hash store.
        if agent_fingerprint(settings, what, hash_store) != agent.fingerprint:
            raise RuntimeError(f"{what}: the step's fingerprint differs from the loaded agent's")
        agent.stats = EngineStats(loaded=True)
        return Lent(agent)

    module.Agent = factory
    try:
        yield
    finally:
        module.Agent = original


# --- inputs: the limited shard ----------------------------------------------------------------


def limited_tars(tars: list[str], keys: set[str], out_dir: Path) -> list[str]:
    """The shard's patch tars cut down to the patches of `keys` (a slide left with none is dropped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for tar in tars:
        slide_id = Path(tar).name.removesuffix(".tar")
        members = {}
        for name, data in read_tar(tar).items():
            match = MEMBER.match(name)
            if match and pair_key(slide_id, int(match.group(1)), int(match.group(2))) in keys:
                members[name] = data
        if members:
            write_tar(members, out_dir / Path(tar).name)
            paths.append(str(out_dir / Path(tar).name))
    return paths


# --- engine settings ----------------------------------------------------------------------------


def llama_server_parallel_option() -> str | None:
    """The option of llama-cpp-python's server that serves requests in parallel, if its --help lists one."""
    help_text = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for option in ("--n_parallel", "--parallel"):
        if option in help_text.split():
            return option
    return None


def engine_settings(what: str, engine: str, params: dict[str, Any], threads: int,
                    parallel: tuple[str, int] | None) -> tuple[dict[str, Any], str]:
    """(the agent's settings for `engine`, how its server is run: '' for an in-process engine)."""
    configured = params[what]
    base = {k: v for k, v in configured.items() if k not in ("engine", "openai")}
    if engine != "openai":
        return {**base, "engine": engine}, ""
    if configured["engine"] == "openai":
        openai = dict(configured["openai"])
        return {**base, "engine": "openai", "openai": openai}, "as params.yaml configures it"
    if what in ("describe", "revise"):
        device = resolve_device(configured.get("device", "auto"), f"{what}.device")
        launch = (f"env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS={threads} "
                  f"{shlex.quote(str(BIN / 'transformers'))} serve {{checkpoint}} --host {{host}} --port {{port}} "
                  f"--device {device}")
        openai = {"launch": launch, "response_format": "none", "startup_timeout_s": 300}
        note = ("one request at a time: transformers serve runs model.generate for one request after another "
                "on its inference thread; its --continuous-batching is for text-only models (LLaVA is a VLM: "
                "'CB: False' in its log)")
    else:
        launch = (f"{{python}} -m llama_cpp.server --model {{checkpoint}} --host {{host}} --port {{port}} "
                  f"--n_ctx {configured['n_ctx']} --n_threads {threads} --n_threads_batch {threads} "
                  f"--n_gpu_layers {configured.get('n_gpu_layers', 0)}")
        version = importlib.metadata.version("llama-cpp-python")
        if parallel is not None:
            launch += f" {parallel[0]} {parallel[1]}"
            note = f"llama-cpp-python {version}'s server with {parallel[0]} {parallel[1]}"
        else:
            note = (f"one request at a time: llama-cpp-python {version}'s server has no --n_parallel/--parallel "
                    f"option (python -m llama_cpp.server --help): one Llama behind a lock; llama.cpp's own C++ "
                    f"llama-server (--parallel N) is not installed here")
        openai = {"launch": launch, "response_format": "json_object", "extra_body": {"repeat_penalty": 1.0},
                  "startup_timeout_s": 300}
    return {**base, "engine": "openai", "openai": openai}, note


def concurrency_of(settings: dict[str, Any]) -> int:
    return int((settings.get("openai") or {}).get("concurrency") or OPENAI_DEFAULTS["concurrency"])


def url_client(settings: dict[str, Any], agent: Agent, concurrency: int) -> Agent:
    """An agent reaching the loaded agent's server by URL with `concurrency` requests in flight."""
    engine = agent.engine
    openai = {k: v for k, v in settings["openai"].items() if k != "launch"}
    openai.update(url=engine.url, model=engine.model, concurrency=concurrency)
    client = Agent(agent.what, {**settings, "openai": openai})
    _ = client.engine  # the HTTP client and its pool: built before timing
    return client


# --- the bench ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shard", default="00000")
    parser.add_argument("--limit", type=int, default=32, help="items per agent (0: the whole shard)")
    parser.add_argument("--agents", default=",".join(AGENTS), help="comma-separated subset of " + ",".join(AGENTS))
    parser.add_argument("--engines", default="",
                        help="comma-separated engines (transformers, llama_cpp, openai); each agent runs those it "
                             "supports; default: describe transformers,openai; revise transformers; "
                             "summarize llama_cpp,openai")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch, llama.cpp and server threads (the rules give 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best reported)")
    parser.add_argument("--concurrency", default="1,4,16,64",
                        help="requests in flight for the openai engine's sweep (comma-separated)")
    args = parser.parse_args()
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    if unknown := sorted(set(agents) - set(AGENTS)):
        parser.error(f"unknown agent(s) {', '.join(unknown)}; choose from {', '.join(AGENTS)}")
    engines_given = [e.strip() for e in args.engines.split(",") if e.strip()]
    known_engines = {e for engines in SUPPORTED.values() for e in engines}
    if unknown := sorted(set(engines_given) - known_engines):
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(sorted(known_engines))}")
    plan = [(what, engine) for what in agents
            for engine in (SUPPORTED[what] if engines_given else DEFAULT_ENGINES[what])
            if not engines_given or engine in engines_given]
    if not plan:
        parser.error("no agent supports the engines given")
    try:
        sweep = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--concurrency takes comma-separated integers, got {args.concurrency!r}")
    if not sweep or sweep[0] < 1:
        parser.error("--concurrency values must be >= 1")

    params = load_sections(args.params)
    torch.set_num_threads(args.threads)
    # Launched servers listen on 127.0.0.1; the sweep's clients reach them by URL: never through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    entries = {e.slide_id: e for e in read_manifest(params["manifest"])}
    shards = shard_slides(list(entries), params["shards"]["slides_per_shard"])
    if args.shard not in shards:
        parser.error(f"no shard {args.shard}; shards: {', '.join(shards)}")
    slides = [{"slide_id": s, "tissue": entries[s].tissue, "project": entries[s].project} for s in shards[args.shard]]
    tars = [f"data/patches/{s}.tar" for s in shards[args.shard]]
    flush_every = params["cache"]["flush_every"]
    parallel = None
    if ("summarize", "openai") in plan and params["summarize"]["engine"] != "openai":
        option = llama_server_parallel_option()
        parallel = (option, max(sweep)) if option else None
    # Import transformers' lazily loaded LLaVA classes now, so the first agent's load time does not include it.
    import transformers

    _ = transformers.LlavaForConditionalGeneration, transformers.AutoProcessor
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on stderr

    header: list[str] = []
    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pathgen-bench-engines-") as tmp_name:
        tmp = Path(tmp_name)
        all_patches = shard_patches(tars, slides)
        patches = all_patches[:args.limit or None]
        keys = {p.key for p in patches}
        tars_in = tars if len(patches) == len(all_patches) else limited_tars(tars, keys, tmp / "patches")
        produced: dict[str, Path] = {}  # each agent's first engine's output: the next agent's input if data/ lacks it
        outputs: dict[str, list[str]] = {}  # each agent's first engine's output texts, by key

        def step_input(previous: str, name: str) -> Path:
            path = Path(f"data/{name}/{args.shard}.parquet")
            if not path.exists():
                if previous not in produced:
                    sys.exit(f"{path} is missing: run `make demo` first (or bench the {previous} agent too)")
                path = produced[previous]
            frame = pl.read_parquet(path).filter(pl.col("key").is_in(list(keys))).sort("key")
            out = tmp / "inputs" / f"{name}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(out)
            return out

        inputs: dict[str, Path] = {}
        for what, engine_name in plan:
            settings, server_note = engine_settings(what, engine_name, params, args.threads, parallel)
            log_dir = tmp / "logs" / f"{what}-{engine_name}"
            step_kw = {"threads": args.threads, "log_dir": log_dir}
            count: Callable[[str], int] | None = None
            if what == "describe":
                requests = [Request(describe_prompt(settings["prompt"], p.tissue), settings["max_new_tokens"],
                                    image=p.image) for p in patches]

                def step(cache_dir: Path, out: Path) -> dict[str, Any]:
                    return run_caption(tars_in, slides, settings, cache_dir, flush_every, out, **step_kw)
            elif what == "revise":
                if "captions" not in inputs:
                    inputs["captions"] = step_input("describe", "captions")
                captions_in = inputs["captions"]
                captions = pl.read_parquet(captions_in)
                by_key = {p.key: p.image for p in patches}
                requests = [Request(revise_prompt(settings["prompt"], d), settings["max_new_tokens"], image=by_key[k],
                                    schema=ops_schema(d, settings["max_ops"], settings["max_sentence_chars"]))
                            for k, d in zip(captions["key"], captions["description"])]

                def step(cache_dir: Path, out: Path) -> dict[str, Any]:
                    return run_revise(tars_in, slides, captions_in, settings, cache_dir, flush_every, out, **step_kw)
            else:
                if "revised" not in inputs:
                    inputs["revised"] = step_input("revise", "revised")
                revised_in = inputs["revised"]
                texts = pl.read_parquet(revised_in)["revised"].to_list()
                requests = [Request(t, settings["max_tokens"]) for t in texts]  # warm-up only

                def step(cache_dir: Path, out: Path) -> dict[str, Any]:
                    return run_summarize(revised_in, settings, cache_dir, flush_every, out, **step_kw)

            def build() -> Agent:
                agent = Agent(what, settings, threads=args.threads, log_dir=log_dir)
                _ = agent.engine
                if what == "summarize":
                    clip_token_counter(settings["tokenizer"])("warm-up")
                return agent

            load_times, agent = timed(build)
            with ExitStack() as stack:
                stack.callback(agent.close)
                engine = agent.engine
                server = getattr(engine, "server", None)
                pid = server.pid if server is not None else None
                if what == "summarize":
                    count = clip_token_counter(settings["tokenizer"])

                def bare_on(client: Agent, count: Callable[[str], int] | None = count) -> Times:
                    if count is None:
                        times, _ = timed(lambda: client.generate(requests), pid)
                        return times
                    wall = cpu = 0.0

                    def ask(prompts: list[str]) -> list[dict[str, Any]]:
                        nonlocal wall, cpu
                        (w, c), answers = timed(
                            lambda: client.generate([Request(p, settings["max_tokens"]) for p in prompts]), pid)
                        wall, cpu = wall + w, cpu + c
                        return [a.record() for a in answers]

                    summarize_all(texts, ask, settings, count)
                    return wall, cpu

                # Warm-up: one batch (the openai engine: a full flight); revise: every request (grammars compiled).
                agent.generate(requests if what == "revise" else requests[:max(1, engine.batch_size)])
                clients = {c: stack.enter_context(url_client(settings, agent, c)) for c in sweep} \
                    if engine_name == "openai" else {}
                if engine_name == "openai":
                    model = f"openai {settings['checkpoint']} at {engine.url} model={engine.model}"
                    detail = f"concurrency={engine.concurrency} (step and bare)"
                elif engine_name == "transformers":
                    model = f"transformers {settings['checkpoint']} device={engine.device}"
                    detail = f"batch={engine.batch_size}"
                else:
                    model = (f"llama_cpp {settings['checkpoint']} device=cpu threads={engine.llm.n_threads}/"
                             f"{engine.llm.n_threads_batch} (generate/prompt)")
                    detail = "batch=1"
                if what == "summarize":
                    detail += f" max_tokens={settings['max_tokens']} max_retries={settings['max_retries']}"
                else:
                    detail += f" max_new_tokens={settings['max_new_tokens']}"
                if what == "revise":
                    detail += " constrained" if engine.can_constrain else " unconstrained (schemas not sent)"
                header.append(f"{what:<10} {model}  {detail}  items={len(texts if count else requests)}")
                if server is not None:
                    header.append(f"{'':<10} server: `{shlex.join(server.argv)}` (launched by the engine: "
                                  f"openai.launch)")
                if engine_name == "openai":
                    header.append(f"{'':<10} server batching: {server_note}")

                runs: dict[str, list[Times]] = {"bare": [], "cold": [], "warm": []}
                sweep_runs: dict[int, list[Times]] = {c: [] for c in clients}
                stats: dict[str, dict[str, Any]] = {}
                with lent_to(MODULES[what], agent):
                    for r in range(args.repeat):
                        run = f"{what}-{engine_name}-{r}"
                        cache_dir, out = tmp / f"cache-{run}", tmp / "out" / f"{run}.parquet"
                        # bare before the step on even runs, after it on odd ones: a drift favours neither
                        for phase in ("bare", "cold", "warm") if r % 2 == 0 else ("cold", "warm", "bare"):
                            if phase == "bare":
                                runs["bare"].append(bare_on(agent))
                            else:
                                times, stats[phase] = timed(lambda: step(cache_dir, out), pid)
                                runs[phase].append(times)
                        for c, client in clients.items():
                            sweep_runs[c].append(bare_on(client))

            first_out = tmp / "out" / f"{what}-{engine_name}-0.parquet"
            frame = pl.read_parquet(first_out).sort("key")
            texts_out = frame[OUTPUT_COLUMN[what]].to_list()
            if what not in outputs:
                produced[what], outputs[what] = first_out, texts_out
            same = sum(a == b for a, b in zip(texts_out, outputs[what]))
            items = frame.height
            (bare_s, bare_cpu), (cold_s, cold_cpu), (warm_s, _) = (best(runs[k]) for k in ("bare", "cold", "warm"))
            rows.append({"agent": what, "engine": engine_name, "items": items, "load": load_times[0],
                         "bare": items / bare_s, "cold": items / cold_s, "warm": items / warm_s,
                         "speedup": cold_s / warm_s, "overhead": cold_s / bare_s, "cpu": cold_cpu / bare_cpu,
                         "spread": max(spread(runs["bare"]), spread(runs["cold"])),
                         "calls": stats["cold"]["requests"], "tokens": stats["cold"]["completion_tokens"],
                         "same": f"{same}/{items}", "cache": f"{stats['cold']['misses']} / {stats['warm']['hits']}"})
            if sweep_runs:
                base_s = best(sweep_runs[sweep[0]])[0]
                for c in sweep:
                    wall = best(sweep_runs[c])[0]
                    sweeps.append({"agent": what, "engine": engine_name, "concurrency": c, "rate": items / wall,
                                   "ratio": base_s / wall})

    print(f"shard={args.shard} items={len(patches)} (of {len(all_patches)}) threads={args.threads} "
          f"repeat={args.repeat} torch={torch.__version__} cuda={torch.cuda.is_available()} cpus={os.cpu_count()}")
    for line in header:
        print(line)
    limit = 1 / TARGET
    print(f"{'agent':<10} {'engine':<12} {'items':>5} {'load s':>7} {'bare it/s':>10} {'cold it/s':>10} "
          f"{'warm it/s':>10} {'warm/cold':>9} {'overhead':>8} {'target':>6} {'spread':>6} {'cpu':>5} {'calls':>5} "
          f"{'tokens':>7} {'same':>7}  cold misses / warm hits")
    for r in rows:
        verdict = "PASS" if r["overhead"] <= limit else "FAIL"
        print(f"{r['agent']:<10} {r['engine']:<12} {r['items']:>5} {r['load']:>7.2f} {r['bare']:>10.2f} "
              f"{r['cold']:>10.2f} {r['warm']:>10.1f} {r['speedup']:>9.1f} {r['overhead']:>8.2f} {verdict:>6} "
              f"{r['spread']:>6.2f} {r['cpu']:>5.2f} {r['calls']:>5} {r['tokens']:>7} {r['same']:>7}  {r['cache']}")
    print(f"target: step >= {TARGET} x bare throughput (overhead <= {limit:.2f})")
    if sweeps:
        print(f"openai concurrency sweep (bare agent.generate with that many requests in flight; ratio: items/s "
              f"over concurrency {sweep[0]}'s)")
        print(f"{'agent':<10} {'engine':<12} {'concurrency':>11} {'items/s':>8} {'ratio':>6}")
        for s in sweeps:
            print(f"{s['agent']:<10} {s['engine']:<12} {s['concurrency']:>11} {s['rate']:>8.2f} {s['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
