"""Hash of the code that shapes a step's output, for Snakemake's params trigger.

Snakemake reruns a job when its rule text changes, but not when a module the
rule calls changes. Each rule therefore carries `code_hash(step)` as a param:
the sha256 of the step's module, the pathgen modules it imports (transitively)
and its resource files. Modules that cannot change output bytes (CLI plumbing,
error classes, config validation) are left out, so editing them reruns nothing.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The module each hashed step starts from (a rule's `code=code_hash(step, ...)` names these).
STEP_MODULES = {
    **{step: f"pathgen.steps.{step}" for step in
       ("tile", "embed", "prompts", "select", "patches", "caption", "revise", "summarize", "assemble")},
    "report": "pathgen.reporting.pages",
}
# Plumbing that cannot change output bytes: command line, error classes, params validation, and the
# item cache (keyed by content: its code decides what is stored and found, not what a model makes).
NEUTRAL = {"pathgen", "pathgen.cli", "pathgen.errors", "pathgen.config", "pathgen.lineage.codehash",
           "pathgen.store.cache", "pathgen.store.cached", "pathgen.store.shutdown"}
STEP_RESOURCES = {"prompts": ("resources/attributes.yaml",)}
# Imports made by name at run time: the engine interface builds the engine params.yaml names, so a
# step that uses it depends on every engine's code (pathgen.models.engine.ENGINES; a test checks).
DYNAMIC_IMPORTS = {"pathgen.models.engine": ("pathgen.models.transformers_engine",
                                             "pathgen.models.llama_cpp_engine", "pathgen.models.openai_engine")}


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    candidates = [PACKAGE_DIR.joinpath(*parts).with_suffix(".py"), PACKAGE_DIR.joinpath(*parts, "__init__.py")]
    return next((p for p in candidates if parts and p.is_file()), None)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pathgen"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pathgen"))
    return found


def step_modules(step: str) -> list[Path]:
    """Source files (sorted) whose code shapes `step`'s output."""
    if step not in STEP_MODULES:
        raise KeyError(f"code_hash: unknown step {step!r} (known: {', '.join(sorted(STEP_MODULES))})")
    todo, seen = [STEP_MODULES[step]], set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in NEUTRAL:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        files.add(path)
        todo.extend(_imports(path))
        todo.extend(DYNAMIC_IMPORTS.get(module, ()))
    files.update(PACKAGE_DIR / r for r in STEP_RESOURCES.get(step, ()))
    return sorted(files)


_STEPS_BY_HASH: dict[str, tuple[str, ...]] = {}


@cache
def code_hash(*steps: str) -> str:
    """sha256 over the relative path and bytes of every file of the steps' `step_modules` (a rule may run several)."""
    value = _hash_files(sorted({path for step in steps for path in step_modules(step)}))
    _STEPS_BY_HASH[value] = steps
    return value


def steps_for_hash(value: str) -> tuple[str, ...] | None:
    """The steps whose `code_hash` gave `value` in this process (how dvc.yaml finds a rule's steps)."""
    return _STEPS_BY_HASH.get(value)


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
