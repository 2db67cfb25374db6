"""Model-agent throughput on one shard: describe (the caption step), revise, summarize.

    python bench/agents.py [--params params.yaml] [--shard 00000] [--limit 32] [--threads 1] [--repeat 3]
                           [--agents describe,revise,summarize]

Works on the first --limit items of the shard in key order, the order the steps use (0: all); a limited
shard is written to a temporary directory (patch tars, captions or revised Parquet holding only those
items), so a step reads what a shard of that size would hold. Prints the shard, threads and models
(device, batch size, generation length, items), then per agent:
  load       seconds to build the agent as the step does (checkpoint fingerprint + weights; summarize
             also loads the CLIP tokenizer that counts caption tokens), once
  bare       items/s of a bare loop over the loaded model: agent.generate on the step's images and
             prompts in the step's batch size (summarize: only the time inside agent.chat, for the
             prompts the step sends, retries included, one at a time as the step does)
  cold       items/s of the step function (run_caption, run_revise, run_summarize) into a fresh cache dir
  warm       items/s of the same step again on that cache dir (every item a hit: no model call)
  warm/cold  the cache's speed-up on a rerun
  overhead   step time (cold) / bare time: 1.00 means the job costs nothing beyond the model calls; the
             rest is reading tars, hashing payloads, the item cache, token counting, writing Parquet
  cpu        the same ratio in process CPU time: near overhead when the extra time is work done in this
             process, below it when the step waits (disk, other processes)
The steps run with the agent already loaded (the agent class they construct is swapped for it), so
model load is left out of cold, warm and bare and reported apart. One untimed call per agent warms the
model up first. With --repeat N every figure but load is the best of N runs (bare, cold and warm
interleaved): on a shared machine other work only ever adds time, and medians of 3 still moved by 20%.
--threads goes to torch and llama.cpp; the rules give model jobs 2, but the default is 1: on a 2-core
machine with other work running, 2 torch threads made a batch-8 generate of the tiny LLaVA take anywhere
from 0.27 s to 2.2 s (OpenMP threads spin waiting for each other), 1 thread a steady 0.27 s. The same
holds for llama.cpp's prompt threads (LlamaCppAgent gives them the job's threads: llama-cpp-python's
default, every core, made 70 summarize calls take 3.5 s to 16.6 s here, against a steady 1.3 s).
Run from the project root after `make demo` (needs data/patches/, data/captions/, data/revised/ and
models/); caches and outputs go to a temporary directory, nothing under the project is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from pathgen.models.llm import LlamaCppAgent  # noqa: E402
from pathgen.models.lmm import LlavaAgent  # noqa: E402
from pathgen.steps.caption import describe_prompt, run_caption  # noqa: E402
from pathgen.steps.revise import revise_prompt, run_revise  # noqa: E402
from pathgen.steps.summarize import run_summarize, summarize_one  # noqa: E402
from pathgen.store.io import read_tar, write_tar  # noqa: E402
from pathgen.store.manifest import read_manifest  # noqa: E402
from pathgen.store.patch_tars import MEMBER, shard_patches  # noqa: E402
from pathgen.store.shards import pair_key, shard_slides  # noqa: E402
from pathgen.text.tokens import clip_token_counter  # noqa: E402

AGENTS = ("describe", "revise", "summarize")
SECTIONS = ("manifest", "shards", "cache", *AGENTS)  # what this bench reads of params.yaml

Times = tuple[float, float]  # (wall seconds, process CPU seconds)


def load_sections(path: str) -> dict[str, Any]:
    """The params.yaml sections this bench uses, validated as a step validates its own view."""
    params = yaml.safe_load(Path(path).read_text())
    view = {key: params[key] for key in SECTIONS if key in params}
    validate_params(view, path, sections=SECTIONS)
    return view


@contextmanager
def preloaded(module: Any, name: str, agent: Any) -> Iterator[None]:
    """Make `module.<name>(...)`, the agent class a step constructs, return the loaded `agent`."""
    original = getattr(module, name)
    setattr(module, name, lambda *args, **kwargs: agent)
    try:
        yield
    finally:
        setattr(module, name, original)


def timed(fn: Callable[[], Any]) -> tuple[Times, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


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


def bare_generate(agent: LlavaAgent, images: list[bytes], prompts: list[str], batch_size: int) -> Times:
    times, _ = timed(lambda: [agent.generate(images[i:i + batch_size], prompts[i:i + batch_size])
                              for i in range(0, len(images), batch_size)])
    return times


def bare_summarize(agent: LlamaCppAgent, texts: list[str], settings: dict[str, Any],
                   count: Callable[[str], int]) -> tuple[Times, int]:
    """(times spent inside agent.chat, chat calls) summarizing `texts` as the step does, without cache."""
    wall = cpu = 0.0
    calls = 0

    def ask(prompt: str) -> str:
        nonlocal wall, cpu, calls
        (w, c), answer = timed(lambda: agent.chat(prompt, settings["max_tokens"]))
        wall, cpu, calls = wall + w, cpu + c, calls + 1
        return answer

    for text in texts:
        summarize_one(text, ask, settings, count)
    return (wall, cpu), calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shard", default="00000")
    parser.add_argument("--limit", type=int, default=32, help="items per agent (0: the whole shard)")
    parser.add_argument("--agents", default=",".join(AGENTS), help="comma-separated subset of " + ",".join(AGENTS))
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (the rules give 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best reported)")
    args = parser.parse_args()
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    if unknown := sorted(set(agents) - set(AGENTS)):
        parser.error(f"unknown agent(s) {', '.join(unknown)}; choose from {', '.join(AGENTS)}")

    params = load_sections(args.params)
    torch.set_num_threads(args.threads)
    entries = {e.slide_id: e for e in read_manifest(params["manifest"])}
    shards = shard_slides(list(entries), params["shards"]["slides_per_shard"])
    if args.shard not in shards:
        parser.error(f"no shard {args.shard}; shards: {', '.join(shards)}")
    slides = [{"slide_id": s, "tissue": entries[s].tissue, "project": entries[s].project} for s in shards[args.shard]]
    tars = [f"data/patches/{s}.tar" for s in shards[args.shard]]
    flush_every = params["cache"]["flush_every"]
    # Import transformers' lazily loaded LLaVA classes now, so the first agent's load time does not include it.
    import transformers

    _ = transformers.LlavaForConditionalGeneration, transformers.AutoProcessor
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on stderr

    header: list[str] = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pathgen-bench-agents-") as tmp_name:
        tmp = Path(tmp_name)
        all_patches = shard_patches(tars, slides)
        patches = all_patches[:args.limit or None]
        keys = {p.key for p in patches}
        tars_in = tars if len(patches) == len(all_patches) else limited_tars(tars, keys, tmp / "patches")
        produced: dict[str, Path] = {}  # each step's output: the next step's input when data/ lacks it

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

        for what in agents:
            settings = params[what]
            calls = 0
            if what in ("describe", "revise"):
                load_times, agent = timed(lambda: LlavaAgent(settings["checkpoint"], settings, what))
                batch = settings["batch_size"]
                module, name = (caption_mod if what == "describe" else revise_mod), "LlavaAgent"
                if what == "describe":
                    images = [p.image for p in patches]
                    prompts = [describe_prompt(settings["prompt"], p.tissue) for p in patches]

                    def step(cache_dir: Path, out: Path) -> dict[str, int]:
                        return run_caption(tars_in, slides, settings, cache_dir, flush_every, out)
                else:
                    captions_in = step_input("describe", "captions")
                    captions = pl.read_parquet(captions_in)
                    by_key = {p.key: p.image for p in patches}
                    images = [by_key[k] for k in captions["key"]]
                    prompts = [revise_prompt(settings["prompt"], d) for d in captions["description"]]

                    def step(cache_dir: Path, out: Path) -> dict[str, int]:
                        return run_revise(tars_in, slides, captions_in, settings, cache_dir, flush_every, out)

                def bare() -> Times:
                    return bare_generate(agent, images, prompts, batch)

                items = len(images)
                agent.generate(images[:batch], prompts[:batch])  # warm-up
                model = f"{agent.backend} {settings['checkpoint']} device={agent.device}"
                detail = f"batch={batch} max_new_tokens={settings['max_new_tokens']}"
            else:
                revised_in = step_input("revise", "revised")
                texts = pl.read_parquet(revised_in)["revised"].to_list()
                load_times, (agent, count) = timed(lambda: (
                    LlamaCppAgent(settings["checkpoint"], settings, what, threads=args.threads),
                    clip_token_counter(settings["tokenizer"])))
                module, name, items = summarize_mod, "LlamaCppAgent", len(texts)

                def step(cache_dir: Path, out: Path) -> dict[str, int]:
                    return run_summarize(revised_in, settings, cache_dir, flush_every, out, threads=args.threads)

                def bare() -> Times:
                    nonlocal calls
                    times, calls = bare_summarize(agent, texts, settings, count)
                    return times

                count("warm-up")
                agent.chat(texts[0] if texts else "warm-up", settings["max_tokens"])  # warm-up
                model = (f"{agent.backend} {settings['checkpoint']} device=cpu "
                         f"threads={agent.llm.n_threads}/{agent.llm.n_threads_batch} (generate/prompt)")
                detail = f"batch=1 max_tokens={settings['max_tokens']} max_retries={settings['max_retries']}"

            runs: dict[str, list[Times]] = {"bare": [], "cold": [], "warm": []}
            stats: dict[str, dict[str, int]] = {}
            with preloaded(module, name, agent):
                for r in range(args.repeat):
                    runs["bare"].append(bare())
                    cache_dir, out = tmp / f"cache-{what}-{r}", tmp / "out" / f"{what}-{r}.parquet"
                    for phase in ("cold", "warm"):
                        times, stats[phase] = timed(lambda: step(cache_dir, out))
                        runs[phase].append(times)
            produced[what] = tmp / "out" / f"{what}-0.parquet"
            if what == "summarize":
                detail += f" chat_calls={calls}"
            header.append(f"{what:<10} {model}  {detail}  items={items}")
            (bare_s, bare_cpu), (cold_s, cold_cpu), (warm_s, _) = (
                tuple(min(t[i] for t in runs[k]) for i in (0, 1)) for k in ("bare", "cold", "warm"))
            rows.append({"agent": what, "items": items, "load": load_times[0], "bare": items / bare_s,
                         "cold": items / cold_s, "warm": items / warm_s, "speedup": cold_s / warm_s,
                         "overhead": cold_s / bare_s, "cpu": cold_cpu / bare_cpu,
                         "cache": f"{stats['cold']['misses']} / {stats['warm']['hits']}"})

    print(f"shard={args.shard} items={len(patches)} (of {len(all_patches)}) threads={args.threads} "
          f"repeat={args.repeat} torch={torch.__version__} cuda={torch.cuda.is_available()}")
    for line in header:
        print(line)
    print(f"{'agent':<10} {'items':>5} {'load s':>7} {'bare it/s':>10} {'cold it/s':>10} {'warm it/s':>10} "
          f"{'warm/cold':>9} {'overhead':>8} {'cpu':>5}  cold misses / warm hits")
    for r in rows:
        print(f"{r['agent']:<10} {r['items']:>5} {r['load']:>7.2f} {r['bare']:>10.2f} {r['cold']:>10.2f} "
              f"{r['warm']:>10.1f} {r['speedup']:>9.1f} {r['overhead']:>8.2f} {r['cpu']:>5.2f}  {r['cache']}")


if __name__ == "__main__":
    main()
