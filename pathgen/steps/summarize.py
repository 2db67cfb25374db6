"""summarize: condense each revised description into a caption that fits CLIP's 77 tokens (step 5).

Tokens are counted with open_clip's tokenizer for the configured CLIP
(`summarize.tokenizer`), start and end tokens included, so a caption never
gets truncated by the trainer. Over the limit, the agent is asked again with
a stricter instruction (up to `max_retries` times; asked in rounds, so a serving engine gets a
whole round's prompts at once); if it still does not fit,
the answer is cut at the last sentence boundary that fits, else the last word
boundary, else the last character. An empty answer falls back to cutting the
revised description itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.models.engine import Agent, Request
from pathgen.models.fingerprint import hash_store
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_answers
from pathgen.store.io import write_parquet
from pathgen.text.sentences import split_sentences
from pathgen.text.tokens import clip_token_counter

SUMMARY_SCHEMA = {"key": pl.String, "slide_id": pl.String, "summary": pl.String, "summary_tokens": pl.Int32,
                  "summary_cut": pl.Boolean, "summary_attempts": pl.Int32, "summarize_engine": pl.String,
                  "summarize_finish": pl.String, "summarize_fingerprint": pl.String}


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


def first_prompt(text: str, settings: dict[str, Any]) -> str:
    return settings["prompt"].replace("{description}", text).replace("{max_words}", str(settings["max_words"]))


def stricter_prompt(answer: str, text: str, settings: dict[str, Any]) -> str:
    return (settings["stricter_prompt"].replace("{summary}", answer or text)
            .replace("{max_words}", str(settings["max_words"] // 2)))


def summarize_all(texts: list[str], ask: Callable[[list[str]], list[dict[str, Any]]], settings: dict[str, Any],
                  count: Callable[[str], int]) -> list[tuple[str, int, bool, int, str]]:
    """(summary, tokens, cut, attempts, finish) per revised description.

    Asked in rounds, so an engine gets every prompt of a round at once: round 1
    asks every description; each later round asks, with the stricter prompt,
    only those whose answer was empty or over the limit. `ask` maps prompts to
    answer records (text, finish)."""
    limit = settings["context_length"]
    out: list[tuple[str, int, bool, int, str] | None] = [None] * len(texts)
    answers = [""] * len(texts)
    finishes = [""] * len(texts)
    pending = list(range(len(texts)))
    prompts = {i: first_prompt(texts[i], settings) for i in pending}
    for attempt in range(1, 2 + settings["max_retries"]):
        records = ask([prompts[i] for i in pending])
        still = []
        for i, record in zip(pending, records, strict=True):
            answers[i], finishes[i] = " ".join(record["text"].split()), record["finish"]
            tokens = count(answers[i])
            if answers[i] and tokens <= limit:
                out[i] = (answers[i], tokens, False, attempt, finishes[i])
            else:
                still.append(i)
                prompts[i] = stricter_prompt(answers[i], texts[i], settings)
        pending = still
        if not pending:
            break
    for i in pending:
        summary, cut = fit_to_limit(answers[i] or texts[i], count, limit)
        out[i] = (summary, count(summary), cut, 1 + settings["max_retries"], finishes[i])
    return out  # type: ignore[return-value]


def summarize_one(text: str, ask: Callable[[str], str], settings: dict[str, Any],
                  count: Callable[[str], int]) -> tuple[str, int, bool, int]:
    """(summary, tokens, cut, attempts) for one description, `ask` mapping a prompt to an answer text."""
    summary, tokens, cut, attempts, _ = summarize_all(
        [text], lambda prompts: [{"text": ask(p), "finish": "stop"} for p in prompts], settings, count)[0]
    return summary, tokens, cut, attempts


def run_summarize(revised_path: str | Path, settings: dict[str, Any], cache_dir: str | Path, flush_every: int,
                  out: str | Path, threads: int | None = None, log_dir: str | Path | None = None) -> dict[str, Any]:
    """The summarize step for one shard; returns the job's counters (cache and engine)."""
    revised = pl.read_parquet(revised_path).sort("key")
    count = clip_token_counter(settings["tokenizer"])
    keys, slide_ids, texts = (revised[c].to_list() for c in ("key", "slide_id", "revised"))
    with Agent("summarize", settings, threads=threads, log_dir=log_dir, hash_store=hash_store(cache_dir)) as agent, \
            ItemCache(cache_dir, "summarize", agent.fingerprint, flush_every) as item_cache:

        def ask(prompts: list[str]) -> list[dict[str, Any]]:
            return cached_answers(item_cache, [p.encode() for p in prompts],
                                  lambda i: Request(prompts[i], settings["max_tokens"]), agent)

        rows = summarize_all(texts, ask, settings, count)
    frame = pl.DataFrame(
        {
            "key": keys,
            "slide_id": slide_ids,
            "summary": [r[0] for r in rows],
            "summary_tokens": [r[1] for r in rows],
            "summary_cut": [r[2] for r in rows],
            "summary_attempts": [r[3] for r in rows],
            "summarize_engine": [agent.engine_name] * len(rows),
            "summarize_finish": [r[4] for r in rows],
            "summarize_fingerprint": [agent.fingerprint] * len(rows),
        },
        schema=SUMMARY_SCHEMA,
    )
    write_parquet(frame, out)
    return {"items": frame.height, **item_cache.stats.as_dict(), **agent.stats.as_dict()}
