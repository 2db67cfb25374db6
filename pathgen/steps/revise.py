"""revise: the revise agent corrects each description against its image (PathGen-1.6M step 4).

The agent answers with a JSON list of sentence-level operations, the inverse
of how its training data was made (appendix C.1.2):

    {"op": "add", "sentence": S}               append S
    {"op": "delete", "sentence": S}            remove the sentence S
    {"op": "edit", "sentence": S, "new": T}    replace the sentence S by T

The answer is validated as a whole: JSON that does not parse, an unknown op,
or a delete/edit of a sentence the description does not contain makes it
`invalid`, and the description is kept unchanged (flagged). `[]` is
`unchanged`. Applying operations is deterministic and cheap, so only the raw
answer is cached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.errors import PathgenError
from pathgen.models.lmm import LlavaAgent
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_map
from pathgen.store.io import write_parquet
from pathgen.store.patch_tars import shard_patches
from pathgen.text.sentences import split_sentences

REVISED_SCHEMA = {"key": pl.String, "slide_id": pl.String, "description": pl.String, "ops": pl.String,
                  "revised": pl.String, "revise_status": pl.String, "revise_fingerprint": pl.String}


def parse_ops(answer: str) -> list[dict[str, str]] | None:
    """The operations of an answer, or None when it is not a well-formed operation list."""
    start, end = answer.find("["), answer.rfind("]")
    if start < 0 or end < start:
        return None
    try:
        ops = json.loads(answer[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(ops, list):
        return None
    fields = {"add": {"op", "sentence"}, "delete": {"op", "sentence"}, "edit": {"op", "sentence", "new"}}
    for op in ops:
        if not (isinstance(op, dict) and op.get("op") in fields and set(op) == fields[op["op"]]
                and all(isinstance(v, str) and v.strip() for v in op.values())):
            return None
    return [{k: " ".join(v.split()) for k, v in op.items()} for op in ops]


def apply_ops(description: str, ops: list[dict[str, str]] | None) -> tuple[str, str]:
    """(revised text, status) with status `applied`, `unchanged` or `invalid`."""
    if ops is None:
        return description, "invalid"
    if not ops:
        return description, "unchanged"
    sentences = split_sentences(description)
    for op in ops:
        if op["op"] == "add":
            sentences.append(op["sentence"])
            continue
        if op["sentence"] not in sentences:
            return description, "invalid"
        index = sentences.index(op["sentence"])
        if op["op"] == "delete":
            del sentences[index]
        else:
            sentences[index] = op["new"]
    return " ".join(sentences), "applied"


def revise_prompt(template: str, description: str) -> str:
    """The revise prompt for one description."""
    return template.replace("{description}", description)


def run_revise(patch_tars: list[str], slides: list[dict[str, Any]], captions_path: str | Path,
               settings: dict[str, Any], cache_dir: str | Path, flush_every: int, out: str | Path) -> dict[str, int]:
    """The revise step for one shard; returns the cache counters."""
    captions = pl.read_parquet(captions_path).sort("key")
    images = {p.key: p.image for p in shard_patches(patch_tars, slides)}
    missing = [k for k in captions["key"] if k not in images]
    if missing:
        raise PathgenError(f"{captions_path}: {len(missing)} caption(s) without a patch, e.g. '{missing[0]}'")
    keys, descriptions = captions["key"].to_list(), captions["description"].to_list()
    prompts = [revise_prompt(settings["prompt"], d) for d in descriptions]
    payloads = [prompt.encode() + b"\0" + images[k] for prompt, k in zip(prompts, keys)]
    agent = LlavaAgent(settings["checkpoint"], settings, "revise")

    def compute(batch: list[int]) -> list[dict[str, str]]:
        answers = agent.generate([images[keys[i]] for i in batch], [prompts[i] for i in batch])
        return [{"text": a} for a in answers]

    with ItemCache(cache_dir, "revise", agent.fingerprint, flush_every) as cache:
        answers = cached_map(cache, payloads, compute, settings["batch_size"])
    parsed = [parse_ops(a["text"]) for a in answers]
    revised = [apply_ops(d, ops) for d, ops in zip(descriptions, parsed)]
    frame = pl.DataFrame(
        {
            "key": keys,
            "slide_id": captions["slide_id"],
            "description": descriptions,
            "ops": [json.dumps(ops if status == "applied" else [], ensure_ascii=False)
                    for ops, (_, status) in zip(parsed, revised)],
            "revised": [text for text, _ in revised],
            "revise_status": [status for _, status in revised],
            "revise_fingerprint": [agent.fingerprint] * len(keys),
        },
        schema=REVISED_SCHEMA,
    )
    write_parquet(frame, out)
    return cache.stats.as_dict()
