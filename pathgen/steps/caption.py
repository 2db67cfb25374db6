"""caption: a detailed description of every patch of a shard by the describe LMM (PathGen-LLaVA_desp).

Prompt (paper, appendix C.2 (6)): "This is a histology image from the
{source of tissue}. Describe this image in detail." Results are cached per
(agent fingerprint, prompt, image bytes), so only new patches reach the
model, and a shard whose patches are all cached never loads it. Each row
records how its description was made: the engine, why generation stopped
(`stop`, or `length` when `describe.max_new_tokens` cut it) and token counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pathgen.models.engine import Agent, Request
from pathgen.models.fingerprint import hash_store
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_answers
from pathgen.store.io import write_parquet
from pathgen.store.patch_tars import Patch, shard_patches

CAPTION_SCHEMA = {"key": pl.String, "slide_id": pl.String, "x": pl.Int64, "y": pl.Int64, "tissue": pl.String,
                  "prompt": pl.String, "description": pl.String, "describe_engine": pl.String,
                  "describe_finish": pl.String, "describe_prompt_tokens": pl.Int32, "describe_tokens": pl.Int32,
                  "describe_fingerprint": pl.String}


def describe_prompt(template: str, tissue: str) -> str:
    """The describe prompt for a patch of `tissue`."""
    return template.format(tissue=tissue)


def caption_patches(patches: list[Patch], agent: Agent, cache: ItemCache, settings: dict[str, Any]) -> pl.DataFrame:
    """Descriptions of `patches` (model called only for cache misses)."""
    prompts = [describe_prompt(settings["prompt"], p.tissue) for p in patches]
    payloads = [prompt.encode() + b"\0" + p.image for prompt, p in zip(prompts, patches)]
    results = cached_answers(cache, payloads,
                             lambda i: Request(prompts[i], settings["max_new_tokens"], image=patches[i].image), agent)
    return pl.DataFrame(
        {
            "key": [p.key for p in patches],
            "slide_id": [p.slide_id for p in patches],
            "x": [p.x for p in patches],
            "y": [p.y for p in patches],
            "tissue": [p.tissue for p in patches],
            "prompt": prompts,
            "description": [r["text"] for r in results],
            "describe_engine": [agent.engine_name] * len(patches),
            "describe_finish": [r["finish"] for r in results],
            "describe_prompt_tokens": [r["prompt_tokens"] for r in results],
            "describe_tokens": [r["completion_tokens"] for r in results],
            "describe_fingerprint": [agent.fingerprint] * len(patches),
        },
        schema=CAPTION_SCHEMA,
    )


def run_caption(patch_tars: list[str], slides: list[dict[str, Any]], settings: dict[str, Any], cache_dir: str | Path,
                flush_every: int, out: str | Path, threads: int | None = None,
                log_dir: str | Path | None = None) -> dict[str, Any]:
    """The caption step for one shard; returns the job's counters (cache and engine)."""
    patches = shard_patches(patch_tars, slides)
    with Agent("describe", settings, threads=threads, log_dir=log_dir, hash_store=hash_store(cache_dir)) as agent, \
            ItemCache(cache_dir, "describe", agent.fingerprint, flush_every) as cache:
        frame = caption_patches(patches, agent, cache, settings)
    write_parquet(frame, out)
    return {"items": frame.height, **cache.stats.as_dict(), **agent.stats.as_dict()}
