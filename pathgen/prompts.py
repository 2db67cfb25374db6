"""Step "prompts": the text prompts a slide's patches are retrieved with.

PathGen-1.6M (section 3.2, Step 1) retrieves representative patches with two
kinds of text prompt, encoded by CLIP's text tower in the select step:

* report prompts: the slide's pathology report cut into parts of at most
  `report_max_words` words (Figure 18, right, asks GPT-4 for <= 50-word parts);
* attribute prompts: morphological attributes of the slide's tissue site
  (Figure 18, left, asks GPT-4 for 20 of them), here read from a YAML table,
  rendered into a template such as "An H&E image of {tissue} tissue showing
  {attribute}.".

Output: one row per prompt, report rows first, then attribute rows.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from pathgen.errors import ConfigError, ReportError
from pathgen.io import write_parquet

DEFAULT_TEMPLATE = "An H&E image of {tissue} tissue showing {attribute}."
DEFAULT_MAX_WORDS = 50
GENERIC = "generic"
TEMPLATE_FIELDS = frozenset({"tissue", "attribute", "project"})
PACKAGED_TABLE = "pathgen/resources/attributes.yaml"

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
}


# --------------------------------------------------------------------------
# attribute table


@dataclass(frozen=True)
class AttributeTable:
    """Attributes per tissue site, a generic fallback, and names that map to sites."""

    sites: dict[str, tuple[str, ...]]
    generic: tuple[str, ...]
    aliases: dict[str, str]
    path: str

    def attributes(self, site: str) -> tuple[str, ...]:
        """The attributes of `site`; the generic list for "generic"."""
        if site == GENERIC:
            return self.generic
        return self.sites[site]


def normalize_key(name: str) -> str:
    """A tissue or project name as table keys are written: lower case, single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with a repeated key."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _attribute_list(value: Any, where: str, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"attribute table {path}: {where} must be a non-empty list of strings")
    seen: set[str] = set()
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"attribute table {path}: {where} has a non-string or empty entry {item!r}")
        if " ".join(item.split()) != item:
            raise ConfigError(
                f"attribute table {path}: {where} entry {item!r} has leading, trailing or repeated whitespace"
            )
        folded = item.casefold()
        if folded in seen:
            raise ConfigError(f"attribute table {path}: {where} lists {item!r} twice")
        seen.add(folded)
        out.append(item)
    return tuple(out)


def _table_key(key: Any, where: str, path: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"attribute table {path}: {where} key {key!r} is not a non-empty string")
    if normalize_key(key) != key:
        raise ConfigError(
            f"attribute table {path}: {where} key {key!r} must be lower case with single spaces "
            f"({normalize_key(key)!r})"
        )
    return key


def _parse_table(text: str, path: str) -> AttributeTable:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"attribute table {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"attribute table {path} must be a mapping with keys sites, generic, aliases")
    unknown = sorted(map(str, set(data) - {"sites", "generic", "aliases"}))
    if unknown:
        raise ConfigError(f"attribute table {path} has unknown top-level keys: {', '.join(unknown)}")
    for required in ("sites", "generic"):
        if required not in data:
            raise ConfigError(f"attribute table {path} lacks the key {required!r}")

    raw_sites = data["sites"]
    if not isinstance(raw_sites, dict) or not raw_sites:
        raise ConfigError(f"attribute table {path}: sites must be a non-empty mapping site -> attributes")
    sites: dict[str, tuple[str, ...]] = {}
    for key, value in raw_sites.items():
        site = _table_key(key, "sites", path)
        if site == GENERIC:
            raise ConfigError(f"attribute table {path}: 'generic' is reserved; give it as the top-level key")
        sites[site] = _attribute_list(value, f"sites.{site}", path)

    generic = _attribute_list(data["generic"], "generic", path)

    raw_aliases = data.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        raise ConfigError(f"attribute table {path}: aliases must be a mapping name -> site")
    aliases: dict[str, str] = {}
    for key, value in raw_aliases.items():
        alias = _table_key(key, "aliases", path)
        if alias in sites:
            raise ConfigError(f"attribute table {path}: alias {alias!r} is also a site key")
        if not isinstance(value, str) or value not in sites:
            raise ConfigError(f"attribute table {path}: alias {alias!r} maps to {value!r}, which is not a site")
        aliases[alias] = value

    return AttributeTable(sites=sites, generic=generic, aliases=aliases, path=path)


def load_attribute_table(path: str | os.PathLike | None = None) -> AttributeTable:
    """Load and validate an attribute table; None loads the packaged one.

    Raises ConfigError naming the file when it is missing or malformed.
    """
    if path is None:
        text = resources.files("pathgen").joinpath("resources/attributes.yaml").read_text(encoding="utf-8")
        return _parse_table(text, PACKAGED_TABLE)
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"attribute table {shown} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"attribute table {shown} is not valid UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"attribute table {shown} cannot be read: {exc.strerror or exc}") from None
    return _parse_table(text, shown)


def resolve_site(table: AttributeTable, tissue: str, project: str | None) -> str:
    """The site key for a slide: its tissue (site or alias), else its project code, else "generic".

    A project code may be given with or without its "TCGA-" prefix.
    """
    key = normalize_key(tissue or "")
    if key in table.sites:
        return key
    if key in table.aliases:
        return table.aliases[key]
    if project:
        code = normalize_key(project)
        for candidate in (code, f"tcga-{code}"):
            if candidate in table.sites:
                return candidate
            if candidate in table.aliases:
                return table.aliases[candidate]
    return GENERIC


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
    check_template(template)
    site = resolve_site(table, tissue, project)
    label = site if site != GENERIC else (normalize_whitespace(tissue or "").lower() or "human")
    project_text = " ".join((project or "").split())
    out = []
    for attribute in table.attributes(site):
        try:
            rendered = template.format(tissue=label, attribute=attribute, project=project_text)
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(f"params prompts.attribute_template {template!r} cannot be rendered: {exc}") from None
        out.append(" ".join(rendered.split()))
    return out


# --------------------------------------------------------------------------
# report splitting

# Words ending in "." that never end a sentence (compared in lower case).
ABBREVIATIONS = frozenset(
    """
    e.g. i.e. eg. ie. approx. appr. ca. cf. vs. viz. al. esp. incl. resp. dept.
    dr. drs. mr. mrs. ms. prof. jr. sr. st. inc. ltd. co. corp.
    """.split()
)
# Words ending in "." that do not end a sentence when a number follows ("No. 5").
NUMBER_ABBREVIATIONS = frozenset("no. nos. fig. figs. vol. ref. pg. art. sec.".split())

_CLOSERS = "\"')]}»”’"
_OPENERS = "\"'([{«“‘"
_LETTER_DOTS = re.compile(r"(?:[^\W\d_]\.){2,}")  # e.g. i.e. u.s. a.m.
_LIST_MARKER = re.compile(r"(?:\d{1,3}|[^\W\d_])\.")  # "1." "b." at the start of an item


def normalize_whitespace(text: str) -> str:
    """`text` with every whitespace run made one space, and no leading/trailing space."""
    return " ".join(text.split())


def _ends_sentence(word: str, following: str | None, item_start: bool) -> bool:
    """Whether a sentence ends after `word` (the next word is `following`)."""
    core = word.rstrip(_CLOSERS)
    if not core:
        return False
    if core[-1] in "!?…":
        return True
    if core[-1] != ".":
        return False
    if following is not None:
        head = following.lstrip(_OPENERS)
        if head[:1].islower():
            return False  # "approx. three", "cf. the": a sentence does not start lower case
    bare = core.lstrip(_OPENERS).lower()
    if bare in ABBREVIATIONS or _LETTER_DOTS.fullmatch(bare):
        return False
    if bare in NUMBER_ABBREVIATIONS and following is not None and following.lstrip("#(")[:1].isdigit():
        return False
    if item_start and _LIST_MARKER.fullmatch(bare):
        return False  # "1. Lung ...", "A. Margins ...": a list marker, not a sentence
    return True


def _sentences(words: list[str]) -> list[list[str]]:
    sentences: list[list[str]] = []
    current: list[str] = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else None
        item_start = not current or current[-1].endswith(":")
        current.append(word)
        if _ends_sentence(word, following, item_start):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace normalised (abbreviations and decimals kept whole)."""
    return [" ".join(words) for words in _sentences(normalize_whitespace(text).split())]


def _split_long(words: list[str], max_words: int) -> list[list[str]]:
    """Cut one over-long sentence into chunks of <= max_words words.

    Each cut is after the last comma/semicolon that fits, provided that keeps
    at least half of max_words in the chunk; otherwise at max_words words.
    """
    chunks: list[list[str]] = []
    rest = words
    shortest = max(1, (max_words + 1) // 2)
    while len(rest) > max_words:
        cut = max_words
        for k in range(max_words, shortest - 1, -1):
            if rest[k - 1].endswith((",", ";")):
                cut = k
                break
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    return chunks


def split_report(text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Cut a report into parts of at most `max_words` words, at sentence boundaries.

    Whole sentences are packed greedily; a sentence longer than `max_words`
    is cut at a comma/semicolon, else between words. Parts are non-empty and
    " ".join(parts) == normalize_whitespace(text). Empty text gives [].
    """
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive integer, got {max_words!r}")
    words = text.split()
    parts: list[list[str]] = []
    current: list[str] = []
    for sentence in _sentences(words):
        if len(sentence) > max_words:
            if current:
                parts.append(current)
            *whole, current = _split_long(sentence, max_words)
            parts.extend(whole)
        elif len(current) + len(sentence) <= max_words:
            current = current + sentence
        else:
            parts.append(current)
            current = sentence
    if current:
        parts.append(current)
    return [" ".join(part) for part in parts]


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
# the step


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
    return out


def build_prompts(
    slide_id: str,
    tissue: str,
    project: str | None,
    report_path: str | os.PathLike | None,
    params: dict[str, Any],
) -> pl.DataFrame:
    """All prompts of one slide: report parts (if it has a report), then attribute prompts.

    Columns: slide_id, kind ("report" | "attribute"), index (0.. within kind,
    int32), text, source (the report's file name, or "table:<site>").
    A report_path of None or "" means the slide has no report.
    """
    cfg = prompt_params(params)
    rows: list[tuple[str, str, int, str, str]] = []

    if report_path is not None and os.fspath(report_path) != "":
        text = read_report(report_path, slide_id)
        name = Path(report_path).name
        for i, part in enumerate(split_report(text, cfg["report_max_words"])):
            rows.append((slide_id, "report", i, part, name))

    table = load_attribute_table(cfg["attribute_table"])
    site = resolve_site(table, tissue, project)
    for i, prompt in enumerate(attribute_prompts(table, tissue, project, cfg["attribute_template"])):
        rows.append((slide_id, "attribute", i, prompt, f"table:{site}"))

    return pl.DataFrame(rows, schema=PROMPT_SCHEMA, orient="row")


def write_prompts(frame: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write a prompts frame as Parquet, atomically and deterministically."""
    write_parquet(frame, path)
