"""summarize: condense each revised description into a caption that fits CLIP's 77 tokens (step 5).

Tokens are counted with open_clip's tokenizer for the configured CLIP
(`summarize.tokenizer`), start and end tokens included, so a caption never
gets truncated by the trainer. Over the limit, the agent is asked again with
a stricter instruction (up to `max_retries` times); if it still does not fit,
the answer is cut at the last sentence boundary that fits, else the last word
boundary, else the last character. An empty answer falls back to cutting the
revised description itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.models.llm import LlamaCppAgent
from pathgen.store.cache import ItemCache
from pathgen.store.io import write_parquet
from pathgen.text.sentences import split_sentences
from pathgen.text.tokens import clip_token_counter

SUMMARY_SCHEMA = {"key": pl.String, "slide_id": pl.String, "summary": pl.String, "summary_tokens": pl.Int32,
                  "summary_cut": pl.Boolean, "summary_attempts": pl.Int32, "summarize_fingerprint": pl.String}


def _longest_prefix(items: list[str], joiner: str, count: Callable[[str], int], limit: int) -> int:
    """How many leading items fit together (token counts grow with the prefix)."""
    low, high = 0, len(items)
    while low < high:
        mid = (low + high + 1) // 2
        if count(joiner.join(items[:mid])) <= limit:
            low = mid
        else:
            high = mid - 1
    return low


def fit_to_limit(text: str, count: Callable[[str], int], limit: int) -> tuple[str, bool]:
    """(text, was it cut): `text` unchanged when it fits, else its longest fitting prefix
    ending at a sentence, else a word, else a character boundary."""
    text = " ".join(text.split())
    if count(text) <= limit:
        return text, False
    sentences = split_sentences(text)
    n = _longest_prefix(sentences, " ", count, limit)
    if n:
        return " ".join(sentences[:n]), True
    words = text.split(" ")
    n = _longest_prefix(words, " ", count, limit)
    if n:
        return " ".join(words[:n]), True
    n = _longest_prefix(list(words[0]), "", count, limit)
    return words[0][:n], True


def summarize_one(text: str, ask: Callable[[str], str], settings: dict[str, Any],
                  count: Callable[[str], int]) -> tuple[str, int, bool, int]:
    """(summary, tokens, cut, attempts) for one revised description."""
    limit = settings["context_length"]
    prompt = settings["prompt"].replace("{description}", text).replace("{max_words}", str(settings["max_words"]))
    answer, attempts = "", 0
    for attempt in range(1 + settings["max_retries"]):
        attempts = attempt + 1
        answer = " ".join(ask(prompt).split())
        tokens = count(answer)
        if answer and tokens <= limit:
            return answer, tokens, False, attempts
        prompt = (settings["stricter_prompt"].replace("{summary}", answer or text)
                  .replace("{max_words}", str(settings["max_words"] // 2)))
    summary, cut = fit_to_limit(answer or text, count, limit)
    return summary, count(summary), cut, attempts


def run_summarize(revised_path: str | Path, settings: dict[str, Any], cache_dir: str | Path, flush_every: int,
                  out: str | Path, threads: int | None = None) -> dict[str, int]:
    """The summarize step for one shard; returns the cache counters."""
    revised = pl.read_parquet(revised_path).sort("key")
    count = clip_token_counter(settings["tokenizer"])
    agent = LlamaCppAgent(settings["checkpoint"], settings, "summarize", threads=threads)
    rows = []
    with ItemCache(cache_dir, "summarize", agent.fingerprint, flush_every) as item_cache:

        def ask(prompt: str) -> str:
            payload = prompt.encode()
            hit = item_cache.get(payload)
            if hit is not None:
                return hit["text"]
            answer = agent.chat(prompt, settings["max_tokens"])
            item_cache.put(payload, {"text": answer})
            return answer

        for key, slide_id, text in revised.select("key", "slide_id", "revised").iter_rows():
            rows.append((key, slide_id, *summarize_one(text, ask, settings, count)))
    frame = pl.DataFrame(
        {
            "key": [r[0] for r in rows],
            "slide_id": [r[1] for r in rows],
            "summary": [r[2] for r in rows],
            "summary_tokens": [r[3] for r in rows],
            "summary_cut": [r[4] for r in rows],
            "summary_attempts": [r[5] for r in rows],
            "summarize_fingerprint": [agent.fingerprint] * len(rows),
        },
        schema=SUMMARY_SCHEMA,
    )
    write_parquet(frame, out)
    return item_cache.stats.as_dict()
