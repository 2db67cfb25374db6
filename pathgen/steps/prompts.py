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

Answers are cached per prompt text (so per report and per tissue/project).
An unusable answer falls back to plain splitting / the static table, and the
row's `source` says so. Without `prompts.llm` the output is that of the
table and the splitter alone.

Output: one row per prompt, report rows first, then attribute rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from pathgen.errors import ConfigError, ReportError
from pathgen.models.llm import LlamaCppAgent
from pathgen.store.cache import ItemCache
from pathgen.store.io import write_parquet
from pathgen.text.attributes import GENERIC, AttributeTable, load_attribute_table, resolve_site
from pathgen.text.hygiene import clean_generated_text
from pathgen.text.sentences import DEFAULT_MAX_WORDS, normalize_whitespace, split_report

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


def read_report(path: str | os.PathLike, slide_id: str) -> str:
    """The text of a slide's report file.

    Raises ReportError naming the file and the slide when it is missing,
    not a UTF-8 text file, or empty/whitespace-only. A leading BOM is dropped.
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
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(
            f"{culprit} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise ReportError(f"{culprit} contains NUL bytes: a binary file, not a text report")
    if not text.strip():
        raise ReportError(f"{culprit} is empty")
    return text


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
# An attribute is a short phrase (the table's have <= 8 words); a longer one would
# push the rendered prompt past CLIP's 77 tokens, so it is dropped as unusable.
MAX_ATTRIBUTE_WORDS = 16
LLM_KEYS = ("checkpoint", "clean_prompt", "attributes_prompt", "n_attributes", "max_tokens", "temperature", "seed",
            "n_ctx")
# What the agent's fingerprint covers besides the checkpoint: the generation settings. The
# prompt templates are not in it; each item's cache payload is the full prompt text instead,
# so editing one template re-asks only the prompts made from it.
GENERATION_KEYS = ("max_tokens", "temperature", "seed", "n_ctx")
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

    `fallback` is True when the LLM's answer was unusable and the plain
    splitter or the static table made the list instead; `reason` says why.
    Compares equal to a plain list with the same items.
    """

    def __init__(self, items: Iterable[str] = (), fallback: bool = False, reason: str | None = None):
        super().__init__(items)
        self.fallback = fallback
        self.reason = reason


def fill_template(template: str, values: dict[str, str]) -> str:
    """`template` with each {name} of `values` replaced, in one pass.

    Other braces stay as written (prompts may show JSON), and text inserted
    for one placeholder is never searched for another.
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def make_llm_agent(llm: dict[str, Any], threads: int | None = None) -> LlamaCppAgent:
    """The text agent of `prompts.llm` (checked by `prompt_params`); ModelError if the GGUF cannot be loaded."""
    settings = {key: llm[key] for key in GENERATION_KEYS}
    return LlamaCppAgent(llm["checkpoint"], settings, "prompts", threads=threads)


def _parse_list(answer: str, key: str) -> list[Any] | None:
    """The list under `key` of a JSON object answer, else None."""
    try:
        obj = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        return None
    return obj[key]


def _ask_list(agent: LlamaCppAgent, cache: ItemCache | None, prompt: str, schema: dict[str, Any],
              key: str) -> tuple[list[Any] | None, str | None]:
    """(the answer's raw list, None), or (None, why there is none). Cached per prompt text.

    The cached value is the raw list, or the answer text itself when it is not
    the JSON asked for (greedy decoding would give the same again). The cache
    must belong to the agent's fingerprint, which covers max_tokens.
    """
    value = cache.get(prompt) if cache is not None else None
    if value is None:
        try:
            answer = agent.chat(prompt, agent.settings.get("max_tokens", DEFAULT_LLM_MAX_TOKENS), schema=schema)
        except ValueError as exc:  # llama.cpp: the prompt does not fit the context
            return None, f"the model could not answer: {exc}"
        parsed = _parse_list(answer, key)
        value = parsed if parsed is not None else answer
        if cache is not None:
            cache.put(prompt, value)
    if isinstance(value, list):
        return value, None
    shown = value if isinstance(value, str) else json.dumps(value)
    return None, f"the answer is not a JSON object with a {key!r} list: {shown[:80]!r}"


def _usable_strings(items: list[Any]) -> list[str]:
    """The string items, cleaned (`clean_generated_text`), without the empty ones."""
    return [text for item in items if isinstance(item, str) and (text := clean_generated_text(item))]


def clean_report(
    agent: LlamaCppAgent,
    cache: ItemCache | None,
    report_text: str,
    max_words: int = DEFAULT_MAX_WORDS,
    *,
    template: str = DEFAULT_CLEAN_PROMPT,
) -> Generated:
    """The report's microscopic findings, per the LLM, in parts of at most `max_words` words.

    The prompt is `template` with {report} (the report, whitespace collapsed)
    and {max_words}; the answer is constrained to FINDINGS_SCHEMA and cached
    under the prompt text (`cache` None: no caching). Each usable finding is
    cut by `split_report`. When the answer is unusable (not that JSON, no
    non-empty finding, prompt too long for the context) the result is
    `split_report(report_text, max_words)` with `fallback` set.
    """
    prompt = fill_template(template, {"report": normalize_whitespace(report_text), "max_words": str(max_words)})
    raw, reason = _ask_list(agent, cache, prompt, FINDINGS_SCHEMA, "findings")
    if raw is not None:
        findings = _usable_strings(raw)
        if findings:
            return Generated(part for finding in findings for part in split_report(finding, max_words))
        reason = f"no usable finding among {len(raw)} item(s)"
    return Generated(split_report(report_text, max_words), fallback=True, reason=reason)


def _clean_attribute(item: Any) -> str:
    """An attribute as it goes into a prompt: cleaned, without list bullet or trailing punctuation."""
    if not isinstance(item, str):
        return ""
    text = _LIST_BULLET.sub("", clean_generated_text(item))
    return text.rstrip(" .,;:").strip()


def llm_attributes(
    agent: LlamaCppAgent,
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
    unknown = sorted(map(str, set(llm) - set(LLM_KEYS)))
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {', '.join(unknown)} (known: {', '.join(LLM_KEYS)})")
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
    and "llm-fallback:table:<site>" where the answer was unusable.
    """
    cfg = prompt_params(params)
    llm = cfg["llm"]
    rows: list[tuple[str, str, int, str, str]] = []

    report_text = None
    if report_path is not None and os.fspath(report_path) != "":
        report_text = read_report(report_path, slide_id)
        name = Path(report_path).name
    table = load_attribute_table(cfg["attribute_table"])
    site = resolve_site(table, tissue, project)
    label = tissue_label(table, tissue, project)

    report_parts: list[str] = []
    report_source = ""
    if llm is None:
        if report_text is not None:
            report_parts, report_source = split_report(report_text, cfg["report_max_words"]), name
        attributes, attribute_source = list(table.attributes(site)), f"table:{site}"
    else:
        agent = make_llm_agent(llm, threads)
        tag = f"llm:{agent.fingerprint[:12]}"
        cache = ItemCache(cache_dir, CACHE_AGENT, agent.fingerprint, flush_every) if cache_dir is not None else None
        try:
            if report_text is not None:
                report_parts = clean_report(agent, cache, report_text, cfg["report_max_words"],
                                            template=llm["clean_prompt"])
                if report_parts.fallback:
                    log.warning("prompts %s: report %s split without the LLM: %s", slide_id, name,
                                report_parts.reason)
                report_source = f"llm-fallback:report:{name}" if report_parts.fallback else f"{tag}:report:{name}"
            attributes = llm_attributes(agent, cache, label, project, llm["n_attributes"],
                                        template=llm["attributes_prompt"], table=table)
            if attributes.fallback:
                log.warning("prompts %s: attributes of %r from the table: %s", slide_id, label, attributes.reason)
            attribute_source = f"llm-fallback:table:{site}" if attributes.fallback else f"{tag}:attributes"
        finally:
            if cache is not None:
                cache.close()
                log.info("prompts %s: cache %s", slide_id, cache.stats.as_dict())

    for i, part in enumerate(report_parts):
        rows.append((slide_id, "report", i, part, report_source))
    for i, prompt in enumerate(render_attributes(attributes, label, project, cfg["attribute_template"])):
        rows.append((slide_id, "attribute", i, prompt, attribute_source))

    return pl.DataFrame(rows, schema=PROMPT_SCHEMA, orient="row")


def write_prompts(frame: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write a prompts frame as Parquet, atomically and deterministically."""
    write_parquet(frame, path)
