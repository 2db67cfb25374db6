"""caption: a detailed description of every patch of a shard by the describe LMM (PathGen-LLaVA_desp).

Prompt (paper, appendix C.2 (6)): "This is a histology image from the
{source of tissue}. Describe this image in detail." Results are cached per
(agent fingerprint, prompt, image bytes), so only new patches reach the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pathgen.models.lmm import LlavaAgent
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_map
from pathgen.store.io import write_parquet
from pathgen.store.patch_tars import Patch, shard_patches

CAPTION_SCHEMA = {"key": pl.String, "slide_id": pl.String, "x": pl.Int64, "y": pl.Int64, "tissue": pl.String,
                  "prompt": pl.String, "description": pl.String, "describe_fingerprint": pl.String}


def describe_prompt(template: str, tissue: str) -> str:
    """The describe prompt for a patch of `tissue`."""
    return template.format(tissue=tissue)


def caption_patches(patches: list[Patch], agent: LlavaAgent, cache: ItemCache, settings: dict[str, Any]) -> pl.DataFrame:
    """Descriptions of `patches` (model called only for cache misses)."""
    prompts = [describe_prompt(settings["prompt"], p.tissue) for p in patches]
    payloads = [prompt.encode() + b"\0" + p.image for prompt, p in zip(prompts, patches)]

    def compute(batch: list[int]) -> list[dict[str, str]]:
        answers = agent.generate([patches[i].image for i in batch], [prompts[i] for i in batch])
        return [{"text": a} for a in answers]

    results = cached_map(cache, payloads, compute, settings["batch_size"])
    return pl.DataFrame(
        {
            "key": [p.key for p in patches],
            "slide_id": [p.slide_id for p in patches],
            "x": [p.x for p in patches],
            "y": [p.y for p in patches],
            "tissue": [p.tissue for p in patches],
            "prompt": prompts,
            "description": [r["text"] for r in results],
            "describe_fingerprint": [agent.fingerprint] * len(patches),
        },
        schema=CAPTION_SCHEMA,
    )


def run_caption(patch_tars: list[str], slides: list[dict[str, Any]], settings: dict[str, Any], cache_dir: str | Path,
                flush_every: int, out: str | Path) -> dict[str, int]:
    """The caption step for one shard; returns the cache counters."""
    patches = shard_patches(patch_tars, slides)
    agent = LlavaAgent(settings["checkpoint"], settings, "describe")
    with ItemCache(cache_dir, "describe", agent.fingerprint, flush_every) as cache:
        frame = caption_patches(patches, agent, cache, settings)
    write_parquet(frame, out)
    return cache.stats.as_dict()
