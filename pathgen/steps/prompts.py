"""Step "prompts": the text prompts a slide's patches are retrieved with.

PathGen-1.6M (section 3.2, Step 1) retrieves representative patches with two
kinds of text prompt, encoded by CLIP's text tower in the select step:

* report prompts: the slide's pathology report cut into parts of at most
  `report_max_words` words (Figure 18, right, asks GPT-4 for <= 50-word parts);
* attribute prompts: morphological attributes of the slide's tissue site
  (Figure 18, left, asks GPT-4 for 20 of them), here read from a YAML table,
  rendered into a template such as "An H&E image of {tissue} tissue showing
  {attribute}.".

With `prompts.llm` set, both come from a text LLM (GGUF through llama.cpp,
answers constrained to a JSON schema), as the paper does with GPT-4:

* `clean_report` asks for the report's microscopic findings (Figure 18, right)
  and cuts each finding to <= `report_max_words` words with the splitter;
* `llm_attributes` asks for `n_attributes` attributes of the tissue (Figure
  18, left), rendered into the same attribute template as the table's.

A report longer than the model's context (`prompts.llm.n_ctx`, less the
answer's `max_tokens`) is cut at sentence boundaries into chunks whose prompt
fits, counted with the model's own tokenizer; each chunk is cleaned and the
findings concatenated in order. Answers are cached per prompt text (so per
report chunk and per tissue/project). An unusable answer falls back to plain
splitting (of that chunk) / the static table, and the row's `source` says so.
Without `prompts.llm` the output is that of the table and the splitter alone.

Report files as a TCGA-scale cohort has them (`read_report`):

* UTF-8 (a BOM dropped), else UTF-16 with its BOM, else the code page
  charset-normalizer reads the bytes in, cp1252 preferred where it reads them
  as well (`guess_encoding`); a report that is not UTF-8 gets
  ";encoding=<codec>" after its rows' source, e.g. "r.txt;encoding=cp1252";
* an empty or whitespace-only file is no report: no report rows, and the
  attribute rows' source ends in ";no-report=empty:<file name>" (a warning
  names the slide and the file);
* a missing file, a directory, an unreadable file, a binary one (NUL bytes,
  not UTF-16) or bytes no encoding explains raise ReportError, one line
  naming the slide and the file.

The table's columns stay PROMPT_SCHEMA's; `source_notes` splits a source
into its origin and these notes.

Output: one row per prompt, report rows first, then attribute rows.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.errors import ConfigError, ReportError
from pathgen.models.engine import Agent
from pathgen.models.fingerprint import hash_store
from pathgen.store.cache import ItemCache
from pathgen.store.io import write_parquet
from pathgen.text.attributes import GENERIC, AttributeTable, load_attribute_table, resolve_site
from pathgen.text.hygiene import clean_generated_text
from pathgen.text.sentences import DEFAULT_MAX_WORDS, normalize_whitespace, split_report, split_sentences

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "An H&E image of {tissue} tissue showing {attribute}."
TEMPLATE_FIELDS = frozenset({"tissue", "attribute", "project"})

PROMPT_SCHEMA = {
    "slide_id": pl.String,
    "kind": pl.String,
    "index": pl.Int32,
    "text": pl.String,
    "source": pl.String,
}

PARAM_DEFAULTS: dict[str, Any] = {
    "attribute_table": None,
    "attribute_template": DEFAULT_TEMPLATE,
    "report_max_words": DEFAULT_MAX_WORDS,
    "llm": None,
}


# --------------------------------------------------------------------------
# attribute table


def check_template(template: Any) -> str:
    """Return `template` if it is a usable attribute template, else raise ConfigError.

    Usable: a string whose only placeholders are {tissue}, {attribute} and
    {project}, with {attribute} among them.
    """
    where = "params prompts.attribute_template"
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {template!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{where} {template!r} is malformed: {exc}") from None
    bad = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
    if bad:
        shown = ", ".join("{" + name + "}" for name in bad)
        raise ConfigError(
            f"{where} {template!r} has unknown placeholders {shown}; allowed: {{tissue}}, {{attribute}}, {{project}}"
        )
    if "attribute" not in fields:
        raise ConfigError(f"{where} {template!r} lacks the {{attribute}} placeholder")
    return template


def attribute_prompts(
    table: AttributeTable, tissue: str, project: str | None, template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """The attribute prompts of a slide, in table order.

    {tissue} is the resolved site name; for the generic fallback it is the
    slide's own tissue name in lower case (or "human" when there is none). {project} is the
    project code as given ("" when None). Whitespace in the result is collapsed.
    """
    site = resolve_site(table, tissue, project)
    return render_attributes(table.attributes(site), tissue_label(table, tissue, project), project, template)


def tissue_label(table: AttributeTable, tissue: str, project: str | None) -> str:
    """The {tissue} of a slide's attribute prompts: its resolved site, else its own tissue name in
    lower case, else "human"."""
    site = resolve_site(table, tissue, project)
    return site if site != GENERIC else (normalize_whitespace(tissue or "").lower() or "human")


def render_attributes(
    attributes: Iterable[str], label: str, project: str | None, template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """`attributes` rendered into `template` with {tissue} = `label`, whitespace collapsed."""
    check_template(template)
    project_text = " ".join((project or "").split())
    out = []
    for attribute in attributes:
        try:
            rendered = template.format(tissue=label, attribute=attribute, project=project_text)
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(f"params prompts.attribute_template {template!r} cannot be rendered: {exc}") from None
        out.append(" ".join(rendered.split()))
    return out


# --------------------------------------------------------------------------
# report splitting


# Code pages the charset guess never picks: UTF-16/32 are read only with their byte-order mark
# (without one, ASCII text in them has NUL bytes and is refused as binary), and EBCDIC, which
# charset-normalizer reports for short Latin texts though no report is written in it.
GUESS_EXCLUDED = ["utf_16", "utf_16_le", "utf_16_be", "utf_32", "utf_32_le", "utf_32_be", "utf_7",
                  "cp037", "cp273", "cp424", "cp500", "cp875", "cp1026", "cp1140"]
# The code page a report that is not UTF-8 most often is: Windows Western, whose text characters
# include all of latin-1's ("µ", "°", "é", "±", "×", "½", curly quotes).
WESTERN = "cp1252"
# A letter, one of the symbols cp1252 puts where cp1250/cp1257 have letters ("j¹dra", "d³o"), a
# letter: a Central European report read as cp1252.
_MISREAD_WESTERN = re.compile(r"[^\W\d_][\u00a1-\u00b4\u00b6-\u00bf][^\W\d_]")
# What a source may carry after its origin: ";encoding=<codec>" on report rows of a report that is
# not UTF-8, ";no-report=<reason>:<file name>" on attribute rows of a slide whose report file gives none.
_SOURCE_NOTE = re.compile(r";(encoding|no-report)=([^;]*)$")


@dataclass(frozen=True)
class Report:
    """A slide's report file as read: its text, the codec it was decoded with, and whether it counts.

    `encoding` is a Python codec name ("utf-8", "utf-16-le", "cp1252", ...). `reason` is None for a
    report, or why the file gives none: "empty" (nothing but whitespace, after any BOM).
    """

    text: str
    encoding: str
    reason: str | None = None


def guess_encoding(data: bytes) -> str | None:
    """The codec that reads `data` (not UTF-8, no NUL byte) as text, or None when none does.

    charset-normalizer judges each candidate code page by how much of a mess its reading is. cp1252 wins
    when its reading is no more of a mess than the library's best guess and shows no Central European
    letter read as a symbol; otherwise the best guess does. Without this preference a cp1252 report
    comes back named "cp1250" (the same reading: the library does not prefer among code pages that
    read the bytes alike) or, when short, read as Big5 (on a tie it prefers multi-byte code pages).
    Known limit: a cp1250 report whose bytes read as plausible cp1252 letters (Czech) is read as
    cp1252; the recorded codec lets such slides be found. Deterministic for a given charset-normalizer
    version (pinned).
    """
    import charset_normalizer

    best = charset_normalizer.from_bytes(data, cp_exclusion=GUESS_EXCLUDED).best()
    western = charset_normalizer.from_bytes(data, cp_isolation=[WESTERN]).best()
    if western is not None and (best is None or western.chaos <= best.chaos + 0.005):
        if best is None or not _MISREAD_WESTERN.search(str(western)) or _MISREAD_WESTERN.search(str(best)):
            return WESTERN
    return codecs.lookup(best.encoding).name if best is not None else None


def decode_report(data: bytes) -> tuple[str, str]:
    """(text, codec) of a report file's bytes; ValueError saying why they are not text.

    UTF-8 first (a BOM dropped); else UTF-16 with its BOM; else, unless there is a NUL byte (binary),
    the guess of `guess_encoding`.
    """
    try:
        return data.decode("utf-8").removeprefix("\ufeff"), "utf-8"
    except UnicodeDecodeError as exc:
        not_utf8 = f"is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    for bom, codec in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec), codec
            except UnicodeDecodeError as exc:
                raise ValueError(f"starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} "
                                 f"({exc.reason} at offset {exc.start + len(bom)})") from None
    if b"\x00" in data:
        raise ValueError("contains NUL bytes: a binary file, not a text report")
    codec = guess_encoding(data)
    if codec is None:
        raise ValueError(f"{not_utf8} and no text encoding explains its bytes")
    try:
        return data.decode(codec), codec
    except UnicodeDecodeError:
        raise ValueError(f"{not_utf8} and no text encoding explains its bytes") from None


def read_report(path: str | os.PathLike, slide_id: str) -> Report:
    """A slide's report file, decoded (`decode_report`).

    Raises ReportError, one line naming the file and the slide, when it is missing, a directory,
    unreadable, binary (NUL bytes that are not UTF-16) or bytes no text encoding explains. A file
    that is empty or whitespace-only is no report: `reason` "empty", logged as a warning. A text
    that is not UTF-8 is logged with its codec.
    """
    shown = os.fspath(path)
    culprit = f"report {shown} for slide {slide_id}"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ReportError(f"{culprit} does not exist") from None
    except IsADirectoryError:
        raise ReportError(f"{culprit} is a directory, not a file") from None
    except OSError as exc:
        raise ReportError(f"{culprit} cannot be read: {exc.strerror or exc}") from None
    try:
        text, encoding = decode_report(data)
    except ValueError as exc:
        raise ReportError(f"{culprit} {exc}") from None
    if "\x00" in text:
        raise ReportError(f"{culprit} contains NUL bytes: a binary file, not a text report")
    if not text.strip():
        log.warning("prompts %s: report %s is empty or whitespace only: no report prompts, attribute prompts only",
                    slide_id, shown)
        return Report(text, encoding, "empty")
    if encoding.startswith("utf-16"):
        log.info("prompts %s: report %s is %s (byte-order mark)", slide_id, shown, encoding)
    elif encoding != "utf-8":
        log.warning("prompts %s: report %s is not UTF-8: read as %s (charset-normalizer's reading)", slide_id,
                    shown, encoding)
    return Report(text, encoding)


def with_notes(source: str, **notes: str) -> str:
    """`source` with ";key=value" notes appended (keys with "_" written "-")."""
    return source + "".join(f";{key.replace('_', '-')}={value}" for key, value in notes.items())


def source_notes(source: str) -> tuple[str, dict[str, str]]:
    """(origin, notes) of a prompts row's source: "r.txt;encoding=cp1252" -> ("r.txt", {"encoding": "cp1252"})."""
    notes: dict[str, str] = {}
    while (match := _SOURCE_NOTE.search(source)) is not None:
        notes[match.group(1)] = match.group(2)
        source = source[:match.start()]
    return source, dict(reversed(notes.items()))


# --------------------------------------------------------------------------
# LLM-written prompts (Figure 18)

# Figure 18, right, in the paper's words; only the answer format of point 5 is
# the one FINDINGS_SCHEMA enforces, and "50" is {max_words} (report_max_words).
DEFAULT_CLEAN_PROMPT = (
    "Your task is to extract descriptions of histomorphological characteristics evident in a whole slide image "
    "from the pathology report. The summary should:\n"
    "1. Concentrate solely on the features visible in the microscopic image, disregarding any additional, "
    "non-visible details like descriptions of the gross morphology of the pathological specimen, clinical data, "
    "and measurements in centimeters (cm) and grams (g).\n"
    "2. Retain the original terminology with high fidelity.\n"
    "3. Refrain from using terms like 'mentioned,' 'description,' or 'report.'\n"
    "4. Should the summary surpass {max_words} words, it must be divided into multiple segments, each not "
    "exceeding {max_words} words.\n"
    '5. The summary must be presented in JSON format, structured as {"findings": ["<content>", "<content>"]}\n'
    "\n"
    "Report: {report}"
)
# Figure 18, left; {project} is the project as the manifest gives it (e.g. "TCGA-LUAD").
DEFAULT_ATTRIBUTES_PROMPT = (
    "This image is a tissue patch from a {tissue} whole slide image of {project}. Please list {count} "
    "pathological features or attributes that might appear in this type of whole slide image."
)
DEFAULT_LLM_MAX_TOKENS = 512
# Context tokens a chat prompt takes besides the user's text: BOS and the chat template's role
# markers (about 10 for Llama-2 and ChatML; templates with a default system prompt take more).
CHAT_OVERHEAD_TOKENS = 64
# An attribute is a short phrase (the table's have <= 8 words); a longer one would
# push the rendered prompt past CLIP's 77 tokens, so it is dropped as unusable.
MAX_ATTRIBUTE_WORDS = 16
LLM_KEYS = ("checkpoint", "clean_prompt", "attributes_prompt", "n_attributes", "max_tokens", "temperature", "seed",
            "n_ctx")
# What the agent's fingerprint covers besides the checkpoint: the generation settings. The
# prompt templates are not in it; each item's cache payload is the full prompt text instead,
# so editing one template re-asks only the prompts made from it.
GENERATION_KEYS = ("max_tokens", "temperature", "seed", "n_ctx")
# Optional: the engine (llama_cpp, or openai for a served text model) and its settings.
ENGINE_KEYS = {"engine": "llama_cpp", "n_gpu_layers": 0, "openai": None}
CACHE_AGENT = "prompts"
FINDINGS_SCHEMA = {
    "type": "object",
    "properties": {"findings": {"type": "array", "items": {"type": "string"}}},
    "required": ["findings"],
}
ATTRIBUTES_SCHEMA = {
    "type": "object",
    "properties": {"attributes": {"type": "array", "items": {"type": "string"}}},
    "required": ["attributes"],
}
_PLACEHOLDER = re.compile(r"\{(report|max_words|tissue|project|count)\}")
_LIST_BULLET = re.compile(r"^(?:[-*\u2022]+|\(?\d{1,3}[.):])\s+")


class Generated(list):
    """A list of strings and how it was made.

    `fallback` is True when an LLM answer was unusable and the plain splitter
    or the static table made (some of) the list instead; `reason` says why.
    `item_fallback` says it per item (a report cleaned in chunks can be part
    LLM, part splitter); `chunks` are the report chunks `clean_report` asked
    about, one prompt each. Compares equal to a plain list with the same items.
    """

    def __init__(self, items: Iterable[str] = (), fallback: bool = False, reason: str | None = None,
                 item_fallback: Iterable[bool] | None = None, chunks: Iterable[str] = ()):
        super().__init__(items)
        self.fallback = fallback
        self.reason = reason
        self.item_fallback = list(item_fallback) if item_fallback is not None else [fallback] * len(self)
        self.chunks = list(chunks)


def fill_template(template: str, values: dict[str, str]) -> str:
    """`template` with each {name} of `values` replaced, in one pass.

    Other braces stay as written (prompts may show JSON), and text inserted
    for one placeholder is never searched for another.
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def make_llm_agent(llm: dict[str, Any], threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                   log_dir: str | os.PathLike | None = None) -> Agent:
    """The text agent of `prompts.llm` (checked by `prompt_params`), loaded on its first uncached call."""
    settings = {"checkpoint": llm["checkpoint"], **{key: llm[key] for key in GENERATION_KEYS},
                **{key: llm.get(key, default) for key, default in ENGINE_KEYS.items()}}
    if settings["openai"] is None:
        del settings["openai"]
    return Agent("prompts", settings, threads=threads, log_dir=log_dir,
                 hash_store=hash_store(cache_dir) if cache_dir is not None else None)


def _parse_list(answer: str, key: str) -> list[Any] | None:
    """The list under `key` of a JSON object answer, else None."""
    try:
        obj = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        return None
    return obj[key]


def _ask_list(agent: Agent, cache: ItemCache | None, prompt: str, schema: dict[str, Any],
              key: str) -> tuple[list[Any] | None, str | None]:
    """(the answer's raw list, None), or (None, why there is none). Cached per prompt text and schema.

    The cached value is the raw list, or the answer text itself when it is not
    the JSON asked for (greedy decoding would give the same again). The cache
    must belong to the agent's fingerprint, which covers max_tokens.
    """
    # The schema constrains the answer, so it is part of the item's payload.
    payload = prompt + "\0" + json.dumps(schema, sort_keys=True)
    value = cache.get(payload) if cache is not None else None
    if value is None:
        try:
            answer = agent.chat(prompt, agent.settings.get("max_tokens", DEFAULT_LLM_MAX_TOKENS), schema=schema)
        except ValueError as exc:  # llama.cpp: the prompt does not fit the context
            return None, f"the model could not answer: {exc}"
        parsed = _parse_list(answer, key)
        value = parsed if parsed is not None else answer
        if cache is not None:
            cache.put(payload, value)
    if isinstance(value, list):
        return value, None
    shown = value if isinstance(value, str) else json.dumps(value)
    return None, f"the answer is not a JSON object with a {key!r} list: {shown[:80]!r}"


def _usable_strings(items: list[Any]) -> list[str]:
    """The string items, cleaned (`clean_generated_text`), without the empty ones."""
    return [text for item in items if isinstance(item, str) and (text := clean_generated_text(item))]


def estimate_tokens(text: str) -> int:
    """A conservative token count for a backend without a tokenizer: one per ASCII digit and per
    non-ASCII UTF-8 byte, one per two other characters (English is about four per token)."""
    digits = sum(ch in "0123456789" for ch in text)
    ascii_other = sum(ch.isascii() for ch in text) - digits
    return digits + (len(text.encode("utf-8")) - digits - ascii_other) + (ascii_other + 1) // 2


def token_counter(agent: Any) -> Callable[[str], int]:
    """How `agent` counts a text's tokens: its engine's tokenizer (no BOS; llama.cpp reads only the GGUF's
    vocabulary for it, not the weights), else `estimate_tokens`."""
    counter = agent.token_counter() if hasattr(agent, "token_counter") else None
    return counter if counter is not None else estimate_tokens


def prompt_budget(agent: Any) -> int | None:
    """The tokens a prompt may take: n_ctx less the answer's max_tokens and CHAT_OVERHEAD_TOKENS; None if unknown."""
    settings = getattr(agent, "settings", None) or {}
    n_ctx = settings.get("n_ctx")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
        return None
    return n_ctx - settings.get("max_tokens", DEFAULT_LLM_MAX_TOKENS) - CHAT_OVERHEAD_TOKENS


def _fit_words(sentence: str, count: Callable[[str], int], room: int) -> list[str]:
    """A sentence too long for `room` tokens cut between words into pieces that fit (a lone word that
    does not fit is a piece of its own)."""
    pieces: list[str] = []
    current: list[str] = []
    used = 0
    for word in sentence.split():
        n = count(word) + 1  # + a joining space
        if current and used + n > room:
            pieces.append(" ".join(current))
            current, used = [], 0
        current.append(word)
        used += n
    if current:
        pieces.append(" ".join(current))
    return pieces


def report_chunks(agent: Any, report_text: str, max_words: int = DEFAULT_MAX_WORDS, *,
                  template: str = DEFAULT_CLEAN_PROMPT) -> list[str]:
    """The report, whitespace collapsed, in chunks whose cleaning prompt fits the agent's context.

    One chunk, the whole report, when its prompt takes at most `prompt_budget(agent)` tokens (or the
    budget is unknown) -- so a report that fits is asked about as before. Otherwise whole sentences
    (`split_sentences`) are packed greedily, a sentence too long on its own cut between words, and
    each chunk's filled prompt is checked with the agent's token count, moving sentences on to the
    next chunk until it fits. " ".join(chunks) is the collapsed report. When the template alone
    leaves no room, the one chunk is the whole report (which the model then cannot answer).
    """
    text = normalize_whitespace(report_text)
    budget = prompt_budget(agent)
    count = token_counter(agent)

    def prompt_tokens(chunk: str) -> int:
        return count(fill_template(template, {"report": chunk, "max_words": str(max_words)}))

    if budget is None or prompt_tokens(text) <= budget:
        return [text]
    room = budget - prompt_tokens("")
    if room < 1:
        return [text]
    pieces: list[tuple[str, int]] = []
    for sentence in split_sentences(text):
        for piece in ([sentence] if count(sentence) + 1 <= room else _fit_words(sentence, count, room)):
            pieces.append((piece, count(piece) + 1))
    packed: list[list[str]] = []
    current: list[str] = []
    used = 0
    for piece, n in pieces:
        if current and used + n > room:
            packed.append(current)
            current, used = [], 0
        current.append(piece)
        used += n
    if current:
        packed.append(current)
    chunks: list[str] = []
    for i, chunk in enumerate(packed):  # the sum of piece counts is an estimate: check the whole prompt
        while len(chunk) > 1 and prompt_tokens(" ".join(chunk)) > budget:
            if i + 1 == len(packed):
                packed.append([])
            packed[i + 1].insert(0, chunk.pop())
        chunks.append(" ".join(chunk))
    return chunks


def clean_report(
    agent: Agent,
    cache: ItemCache | None,
    report_text: str,
    max_words: int = DEFAULT_MAX_WORDS,
    *,
    template: str = DEFAULT_CLEAN_PROMPT,
) -> Generated:
    """The report's microscopic findings, per the LLM, in parts of at most `max_words` words.

    The report is cut by `report_chunks` into chunks whose prompt fits the
    context (one chunk, the whole report, when it fits). Each chunk's prompt
    is `template` with {report} (the chunk) and {max_words}; the answer is
    constrained to FINDINGS_SCHEMA and cached under the prompt text (`cache`
    None: no caching). Each usable finding is cut by `split_report`; the
    findings of the chunks are concatenated in order. A chunk whose answer is
    unusable (not that JSON, no non-empty finding, prompt too long for the
    context) gives `split_report(chunk, max_words)` instead, and `fallback`
    is set; when no chunk was usable the result is `split_report(report_text,
    max_words)`, the output without an LLM.
    """
    chunks = report_chunks(agent, report_text, max_words, template=template)
    parts: list[str] = []
    flags: list[bool] = []
    reasons: list[str] = []
    for i, chunk in enumerate(chunks):
        prompt = fill_template(template, {"report": chunk, "max_words": str(max_words)})
        raw, reason = _ask_list(agent, cache, prompt, FINDINGS_SCHEMA, "findings")
        got: list[str] = []
        if raw is not None:
            findings = _usable_strings(raw)
            got = [part for finding in findings for part in split_report(finding, max_words)]
            reason = None if got else f"no usable finding among {len(raw)} item(s)"
        if reason is not None:
            got = split_report(chunk, max_words)
            reasons.append(reason if len(chunks) == 1 else f"chunk {i + 1}/{len(chunks)}: {reason}")
        parts.extend(got)
        flags.extend([reason is not None] * len(got))
    if reasons and len(reasons) == len(chunks):
        return Generated(split_report(report_text, max_words), fallback=True, reason="; ".join(reasons),
                         chunks=chunks)
    return Generated(parts, fallback=bool(reasons), reason="; ".join(reasons) or None, item_fallback=flags,
                     chunks=chunks)


def _clean_attribute(item: Any) -> str:
    """An attribute as it goes into a prompt: cleaned, without list bullet or trailing punctuation."""
    if not isinstance(item, str):
        return ""
    text = _LIST_BULLET.sub("", clean_generated_text(item))
    return text.rstrip(" .,;:").strip()


def llm_attributes(
    agent: Agent,
    cache: ItemCache | None,
    tissue: str,
    project: str | None,
    count: int = 20,
    *,
    template: str = DEFAULT_ATTRIBUTES_PROMPT,
    max_words: int = MAX_ATTRIBUTE_WORDS,
    table: AttributeTable | None = None,
) -> Generated:
    """Up to `count` pathological attributes of `tissue`, per the LLM.

    The prompt is `template` with {tissue}, {project} ("" for none) and
    {count}; the answer is constrained to ATTRIBUTES_SCHEMA and cached under
    the prompt text. Attributes are cleaned, those empty or longer than
    `max_words` words dropped, repeats (ignoring case) dropped, and the rest
    cut to `count`. Fewer than half of `count` left: the attributes of the
    tissue's site in `table` (None: the packaged table), with `fallback` set.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    project_text = normalize_whitespace(project or "")
    prompt = fill_template(template, {"tissue": normalize_whitespace(tissue or ""), "project": project_text,
                                      "count": str(count)})
    raw, reason = _ask_list(agent, cache, prompt, ATTRIBUTES_SCHEMA, "attributes")
    if raw is not None:
        seen: set[str] = set()
        attributes: list[str] = []
        for item in raw:
            text = _clean_attribute(item)
            if not text or len(text.split()) > max_words or text.casefold() in seen:
                continue
            seen.add(text.casefold())
            attributes.append(text)
        attributes = attributes[:count]
        if 2 * len(attributes) >= count:
            return Generated(attributes)
        reason = f"{len(attributes)} usable attribute(s), fewer than half of {count}"
    table = table if table is not None else load_attribute_table()
    return Generated(table.attributes(resolve_site(table, tissue, project)), fallback=True, reason=reason)


# --------------------------------------------------------------------------
# the step


def _check_llm(llm: Any) -> dict[str, Any] | None:
    where = "params prompts.llm"
    if llm is None:
        return None
    if not isinstance(llm, dict):
        raise ConfigError(f"{where} must be null or a mapping with keys {', '.join(LLM_KEYS)}, got {llm!r}")
    known = (*LLM_KEYS, *ENGINE_KEYS)
    unknown = sorted(map(str, set(llm) - set(known)))
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {', '.join(unknown)} (known: {', '.join(known)})")
    if llm.get("engine", "llama_cpp") not in ("llama_cpp", "openai"):
        raise ConfigError(f"{where}.engine must be llama_cpp or openai, got {llm['engine']!r}")
    missing = [key for key in LLM_KEYS if key not in llm]
    if missing:
        raise ConfigError(f"{where} lacks the keys: {', '.join(missing)}")
    checkpoint = llm["checkpoint"]
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise ConfigError(f"{where}.checkpoint must be a GGUF file path, got {checkpoint!r}")
    for key, needed in (("clean_prompt", "report"), ("attributes_prompt", "tissue")):
        value = llm[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}.{key} must be a non-empty string, got {value!r}")
        if "{" + needed + "}" not in value:
            raise ConfigError(f"{where}.{key} {value!r} lacks the {{{needed}}} placeholder")
    for key, low in (("n_attributes", 1), ("max_tokens", 1), ("seed", 0), ("n_ctx", 128)):
        value = llm[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{where}.{key} must be an integer >= {low}, got {value!r}")
    temperature = llm["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"{where}.temperature must be a number >= 0, got {temperature!r}")
    return dict(llm)


def prompt_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The `prompts` section of params.yaml, checked, with defaults filled in."""
    given = dict(params or {})
    unknown = sorted(map(str, set(given) - set(PARAM_DEFAULTS)))
    if unknown:
        raise ConfigError(
            f"params prompts has unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(PARAM_DEFAULTS))})"
        )
    out = {**PARAM_DEFAULTS, **given}
    table = out["attribute_table"]
    if table is not None and not (isinstance(table, (str, os.PathLike)) and os.fspath(table)):
        raise ConfigError(f"params prompts.attribute_table must be null or a file path, got {table!r}")
    check_template(out["attribute_template"])
    max_words = out["report_max_words"]
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ConfigError(f"params prompts.report_max_words must be a positive integer, got {max_words!r}")
    out["llm"] = _check_llm(out["llm"])
    return out


def build_prompts(
    slide_id: str,
    tissue: str,
    project: str | None,
    report_path: str | os.PathLike | None,
    params: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    flush_every: int = 32,
    threads: int | None = None,
) -> pl.DataFrame:
    """All prompts of one slide: report parts (if it has a report), then attribute prompts.

    Columns: slide_id, kind ("report" | "attribute"), index (0.. within kind,
    int32), text, source. A report_path of None or "" means the slide has no report.

    Without `params["llm"]`, report parts are the report split by sentences
    (source: the report's file name) and attributes come from the table
    (source "table:<site>"). With it, one agent writes both, cached under
    `cache_dir` (None: not cached; `threads`: llama.cpp CPU threads); sources
    are "llm:<fingerprint[:12]>:report:<file name>" and
    "llm:<fingerprint[:12]>:attributes", or "llm-fallback:report:<file name>"
    and "llm-fallback:table:<site>" where the answer was unusable (per report
    chunk, so per row).

    Notes after a source (`source_notes` reads them back): report rows of a
    report that is not UTF-8 end in ";encoding=<codec>" (e.g.
    "r.txt;encoding=cp1252"); when the report file is empty or whitespace
    only there are no report rows and the attribute rows end in
    ";no-report=empty:<file name>" (e.g. "table:lung;no-report=empty:r.txt").
    A UTF-8 report, or no report_path, adds no note.
    """
    cfg = prompt_params(params)
    llm = cfg["llm"]
    rows: list[tuple[str, str, int, str, str]] = []

    report_text = None
    report_note = attribute_note = ""
    if report_path is not None and os.fspath(report_path) != "":
        report = read_report(report_path, slide_id)
        name = Path(report_path).name
        if report.reason is not None:
            attribute_note = with_notes("", no_report=f"{report.reason}:{name}")
        else:
            report_text = report.text
            report_note = with_notes("", encoding=report.encoding) if report.encoding != "utf-8" else ""
    table = load_attribute_table(cfg["attribute_table"])
    site = resolve_site(table, tissue, project)
    label = tissue_label(table, tissue, project)

    report_parts: list[str] = []
    report_sources: list[str] = []
    if llm is None:
        if report_text is not None:
            report_parts = split_report(report_text, cfg["report_max_words"])
            report_sources = [name + report_note] * len(report_parts)
        attributes, attribute_source = list(table.attributes(site)), f"table:{site}"
    else:
        agent = make_llm_agent(llm, threads, cache_dir)
        tag = f"llm:{agent.fingerprint[:12]}"
        cache = ItemCache(cache_dir, CACHE_AGENT, agent.fingerprint, flush_every) if cache_dir is not None else None
        try:
            if report_text is not None:
                report_parts = clean_report(agent, cache, report_text, cfg["report_max_words"],
                                            template=llm["clean_prompt"])
                if len(report_parts.chunks) > 1:
                    log.info("prompts %s: report %s cleaned in %d chunks that fit n_ctx %d", slide_id, name,
                             len(report_parts.chunks), llm["n_ctx"])
                if report_parts.fallback:
                    log.warning("prompts %s: report %s split without the LLM: %s", slide_id, name,
                                report_parts.reason)
                report_sources = [(f"llm-fallback:report:{name}" if fell_back else f"{tag}:report:{name}") + report_note
                                  for fell_back in report_parts.item_fallback]
            attributes = llm_attributes(agent, cache, label, project, llm["n_attributes"],
                                        template=llm["attributes_prompt"], table=table)
            if attributes.fallback:
                log.warning("prompts %s: attributes of %r from the table: %s", slide_id, label, attributes.reason)
            attribute_source = f"llm-fallback:table:{site}" if attributes.fallback else f"{tag}:attributes"
        finally:
            agent.close()
            if cache is not None:
                cache.close()
                log.info("prompts %s: cache %s, model loaded: %s", slide_id, cache.stats.as_dict(),
                         agent.stats.loaded)

    for i, (part, source) in enumerate(zip(report_parts, report_sources, strict=True)):
        rows.append((slide_id, "report", i, part, source))
    for i, prompt in enumerate(render_attributes(attributes, label, project, cfg["attribute_template"])):
        rows.append((slide_id, "attribute", i, prompt, attribute_source + attribute_note))

    return pl.DataFrame(rows, schema=PROMPT_SCHEMA, orient="row")


def write_prompts(frame: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write a prompts frame as Parquet, atomically and deterministically."""
    write_parquet(frame, path)
