"""params.yaml: loading, validation against the packaged JSON schema, step views.

A step sees only the sections it is made from (`STEP_SECTIONS`), so Snakemake's
params trigger and DVC's params deps rerun a step exactly when one of its own
knobs changes.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pathgen.errors import ConfigError

# params.yaml sections each step is made from.
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "tile": ("tile",),
    "embed": ("clip", "embed"),
    "prompts": ("prompts",),
    "select": ("seed", "clip", "select"),
    "patches": ("patches",),
    "caption": ("describe",),
    "revise": ("revise",),
    "summarize": ("summarize",),
    "assemble": ("clip", "assemble"),
    "report_pages": ("seed",),
}


@cache
def params_schema() -> dict[str, Any]:
    """The JSON schema of params.yaml, as shipped with the package."""
    text = resources.files("pathgen.resources").joinpath("params.schema.yaml").read_text()
    return yaml.safe_load(text)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The offending key is in the message, not the path: name it.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(",".join(extra))
    elif error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        parts.append(",".join(missing))
    return ".".join(parts) or "<top level>"


def validate_params(params: Any, source: str = "params.yaml", sections: tuple[str, ...] | None = None) -> None:
    """Raise ConfigError naming the first offending key when `params` breaks the schema.

    With `sections`, only those top-level sections are required (a step's view).
    """
    schema = params_schema()
    if sections is not None:
        schema = copy.deepcopy(schema)
        schema["required"] = list(sections)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        err = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: key '{_key_path(err)}': {err.message}{more}")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml; ConfigError names the file and the key."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    validate_params(params, str(path))
    return params


def step_params(params: dict[str, Any], step: str) -> dict[str, Any]:
    """The sections of `params` that `step` is made from."""
    try:
        sections = STEP_SECTIONS[step]
    except KeyError:
        raise ConfigError(f"unknown step '{step}'; steps: {', '.join(STEP_SECTIONS)}") from None
    return {key: params[key] for key in sections}


def step_params_json(params: dict[str, Any], step: str) -> str:
    """`step_params` as canonical JSON: what Snakemake rules pass and compare."""
    return json.dumps(step_params(params, step), sort_keys=True, separators=(",", ":"))


def parse_step_params(text: str, step: str, source: str = "--params-json") -> dict[str, Any]:
    """Parse and validate a step's params given as JSON on the command line."""
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    validate_params(params, source, sections=STEP_SECTIONS[step])
    return step_params(params, step)
