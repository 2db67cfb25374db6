"""The attribute table: morphological attributes per tissue site (`pathgen/resources/attributes.yaml`
or a user's YAML), a generic fallback, and the aliases (tissue synonyms, TCGA project codes) that
resolve a slide to its site."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pathgen.errors import ConfigError

GENERIC = "generic"


PACKAGED_TABLE = "pathgen/resources/attributes.yaml"


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
