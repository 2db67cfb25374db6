# Shared by all rules: params.yaml validation, the slide manifest, input functions.
# No pipeline logic here: every step is a `pathgen` command.

from pathgen.codehash import code_hash
from pathgen.config import step_params_json, validate_params
from pathgen.errors import PathgenError
from pathgen.manifest import SLIDE_ID, read_manifest

try:
    validate_params(config, source="params.yaml (with --config overrides)")
    SLIDES = {entry.slide_id: entry for entry in read_manifest(config["manifest"])}
except PathgenError as exc:
    raise WorkflowError(f"pathgen: {exc}") from None

SLIDE_IDS = sorted(SLIDES)


wildcard_constraints:
    slide=SLIDE_ID.pattern.strip("^$"),


def step_view(step):
    """The step's params.yaml sections as JSON; a function, so '{...}' in values is not a wildcard."""
    return lambda wildcards: step_params_json(config, step)


def slide_path(wildcards):
    return SLIDES[wildcards.slide].path


def slide_mpp(wildcards):
    mpp = SLIDES[wildcards.slide].mpp
    return "" if mpp is None else repr(mpp)


def slide_report(wildcards):
    report_file = SLIDES[wildcards.slide].report
    return [report_file] if report_file else []


def clip_files(wildcards):
    files = [config["clip"]["checkpoint"]]
    if config["clip"]["config"]:
        files.append(config["clip"]["config"])
    return files
