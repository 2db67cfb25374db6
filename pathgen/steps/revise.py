"""revise: the revise agent corrects each description against its image (PathGen-1.6M step 4).

The agent answers with a JSON list of sentence-level operations, the inverse
of how its training data was made (appendix C.1.2):

    {"op": "add", "sentence": S}               append S
    {"op": "delete", "sentence": S}            remove the sentence S
    {"op": "edit", "sentence": S, "new": T}    replace the sentence S by T

Each answer is decoded under a JSON schema built for its own description
(`ops_schema`): delete and edit may only name one of that description's
sentences (of at most `max_sentence_chars` characters), at most `max_ops`
operations, new text at most `max_sentence_chars` characters: an answer
is at most max_ops * (2 * max_sentence_chars + ~40) characters, which
`max_new_tokens` should allow. So with an engine that enforces schemas
every complete answer applies. Operations apply in order; one naming a
sentence that an earlier operation already removed or replaced takes no
effect, as does an add or edit whose text is blank.

Status per description: `applied` (some operation changed it), `unchanged`
(`[]`, or nothing took effect), `invalid` (the answer is not such a list:
an engine that cannot constrain, or an answer cut by `max_new_tokens`; the
description is kept as it was). The raw answer is cached; applying is cheap
and deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.errors import PathgenError
from pathgen.models.engine import Agent, Request
from pathgen.models.fingerprint import hash_store
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_answers
from pathgen.store.io import write_parquet
from pathgen.store.patch_tars import shard_patches
from pathgen.text.sentences import normalize_whitespace, split_sentences

REVISED_SCHEMA = {"key": pl.String, "slide_id": pl.String, "description": pl.String, "ops": pl.String,
                  "revised": pl.String, "revise_status": pl.String, "revise_engine": pl.String,
                  "revise_constrained": pl.Boolean, "revise_finish": pl.String, "revise_tokens": pl.Int32,
                  "revise_fingerprint": pl.String}
STATUSES = ("applied", "unchanged", "invalid")
_FIELDS = {"add": {"op", "sentence"}, "delete": {"op", "sentence"}, "edit": {"op", "sentence", "new"}}


def ops_schema(description: str, max_ops: int, max_sentence_chars: int) -> dict[str, Any]:
    """The JSON schema of every applicable answer for `description`."""
    text = {"type": "string", "minLength": 1, "maxLength": max_sentence_chars}
    choices: list[dict[str, Any]] = [
        {"type": "object", "properties": {"op": {"const": "add"}, "sentence": text},
         "required": ["op", "sentence"], "additionalProperties": False},
    ]
    # A sentence longer than an edit may write cannot be named (it would take an answer that long).
    targets = [t for t in dict.fromkeys(split_sentences(description)) if len(t) <= max_sentence_chars]
    if targets:
        named = {"enum": targets}
        choices += [
            {"type": "object", "properties": {"op": {"const": "delete"}, "sentence": named},
             "required": ["op", "sentence"], "additionalProperties": False},
            {"type": "object", "properties": {"op": {"const": "edit"}, "sentence": named, "new": text},
             "required": ["op", "sentence", "new"], "additionalProperties": False},
        ]
    return {"type": "array", "items": {"anyOf": choices}, "maxItems": max_ops}


def parse_ops(answer: str) -> list[dict[str, str]] | None:
    """The operations of an answer (texts whitespace-normalised), or None when it is not a well-formed list."""
    start, end = answer.find("["), answer.rfind("]")
    if start < 0 or end < start:
        return None
    try:
        ops = json.loads(answer[start : end + 1])
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(ops, list):
        return None
    for op in ops:
        if not (isinstance(op, dict) and op.get("op") in _FIELDS and set(op) == _FIELDS[op["op"]]
                and all(isinstance(v, str) for v in op.values())):
            return None
    return [{k: normalize_whitespace(v) for k, v in op.items()} for op in ops]


def apply_ops(description: str, ops: list[dict[str, str]] | None) -> tuple[str, str, list[dict[str, str]]]:
    """(revised text, status, the operations that took effect).

    delete/edit name a sentence of `description`; naming one it does not
    have makes the answer `invalid` (only possible without a schema)."""
    if ops is None:
        return description, "invalid", []
    original = split_sentences(description)
    if any(op["op"] != "add" and op["sentence"] not in original for op in ops):
        return description, "invalid", []
    sentences: list[str | None] = list(original)
    untouched = [True] * len(original)
    added: list[str] = []
    applied: list[dict[str, str]] = []
    for op in ops:
        if op["op"] == "add":
            if op["sentence"]:
                added.append(op["sentence"])
                applied.append(op)
            continue
        index = next((i for i, s in enumerate(original) if s == op["sentence"] and untouched[i]), None)
        if index is None or (op["op"] == "edit" and (not op["new"] or op["new"] == op["sentence"])):
            continue
        untouched[index] = False
        sentences[index] = None if op["op"] == "delete" else op["new"]
        applied.append(op)
    if not applied:
        return description, "unchanged", []
    return " ".join([s for s in sentences if s is not None] + added), "applied", applied


def revise_prompt(template: str, description: str) -> str:
    """The revise prompt for one description."""
    return template.replace("{description}", description)


def revise_payload(prompt: str, schema: dict[str, Any], image: bytes) -> bytes:
    """An item's cache payload: the prompt, the schema that constrains the answer, the image bytes."""
    return prompt.encode() + b"\0" + json.dumps(schema, sort_keys=True).encode() + b"\0" + image


def run_revise(patch_tars: list[str], slides: list[dict[str, Any]], captions_path: str | Path,
               settings: dict[str, Any], cache_dir: str | Path, flush_every: int, out: str | Path,
               threads: int | None = None, log_dir: str | Path | None = None) -> dict[str, Any]:
    """The revise step for one shard; returns the job's counters (cache, engine, statuses)."""
    captions = pl.read_parquet(captions_path).sort("key")
    images = {p.key: p.image for p in shard_patches(patch_tars, slides)}
    missing = [k for k in captions["key"] if k not in images]
    if missing:
        raise PathgenError(f"{captions_path}: {len(missing)} caption(s) without a patch, e.g. '{missing[0]}'")
    keys, descriptions = captions["key"].to_list(), captions["description"].to_list()
    prompts = [revise_prompt(settings["prompt"], d) for d in descriptions]
    schemas = [ops_schema(d, settings["max_ops"], settings["max_sentence_chars"]) for d in descriptions]
    payloads = [revise_payload(prompt, schema, images[k]) for prompt, schema, k in zip(prompts, schemas, keys)]

    def request(i: int) -> Request:
        return Request(prompts[i], settings["max_new_tokens"], image=images[keys[i]], schema=schemas[i])

    with Agent("revise", settings, threads=threads, log_dir=log_dir, hash_store=hash_store(cache_dir)) as agent, \
            ItemCache(cache_dir, "revise", agent.fingerprint, flush_every) as cache:
        answers = cached_answers(cache, payloads, request, agent)
    revised = [apply_ops(d, parse_ops(a["text"])) for d, a in zip(descriptions, answers)]
    frame = pl.DataFrame(
        {
            "key": keys,
            "slide_id": captions["slide_id"],
            "description": descriptions,
            "ops": [json.dumps(applied, ensure_ascii=False) for _, _, applied in revised],
            "revised": [text for text, _, _ in revised],
            "revise_status": [status for _, status, _ in revised],
            "revise_engine": [agent.engine_name] * len(keys),
            "revise_constrained": [a["constrained"] for a in answers],
            "revise_finish": [a["finish"] for a in answers],
            "revise_tokens": [a["completion_tokens"] for a in answers],
            "revise_fingerprint": [agent.fingerprint] * len(keys),
        },
        schema=REVISED_SCHEMA,
    )
    write_parquet(frame, out)
    counts = frame["revise_status"].value_counts()
    by_status = dict(zip(counts["revise_status"], counts["count"]))
    return {"items": frame.height, **cache.stats.as_dict(), **agent.stats.as_dict(),
            **{s: int(by_status.get(s, 0)) for s in STATUSES}}
