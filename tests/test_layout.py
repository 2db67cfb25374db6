"""The package layout is the architecture: steps never import each other, shared code lives in shared
subpackages, and each step's code hash covers exactly the files its output depends on."""

import ast
from pathlib import Path

import pytest

from pathgen.lineage.codehash import PACKAGE_DIR, STEP_MODULES, code_hash, step_modules

# Every file whose edit reruns a step (and so its jobs downstream). Widening one of these sets reruns
# real compute on a cohort (revise and summarize reload 13B models): change it on purpose only.
# The engine interface builds the engine params.yaml names (pathgen.models.engine.ENGINES), so a model step
# follows every engine's module.
ENGINE_FILES = {"models/engine.py", "models/fingerprint.py", "models/transformers_engine.py",
                "models/llama_cpp_engine.py", "models/openai_engine.py", "models/server.py", "models/device.py",
                "store/io.py", "text/hygiene.py"}
STEP_FILES = {
    "tile": {"steps/tile.py", "store/io.py", "store/status.py", "wsi/slide.py", "wsi/tissue.py"},
    "embed": {"steps/embed.py", "models/clip.py", "models/device.py", "models/fingerprint.py",
              "store/embeddings.py", "store/io.py", "wsi/quality.py", "wsi/slide.py"},
    "prompts": {"steps/prompts.py", *ENGINE_FILES, "resources/attributes.yaml", "text/attributes.py",
                "text/sentences.py"},
    "select": {"steps/select.py", "models/clip.py", "models/device.py", "models/fingerprint.py",
               "store/embeddings.py", "store/io.py", "store/seeds.py", "store/status.py", "wsi/quality.py"},
    "patches": {"steps/patches.py", "store/io.py", "store/patch_tars.py", "store/shards.py", "wsi/slide.py"},
    "caption": {"steps/caption.py", *ENGINE_FILES, "store/patch_tars.py", "store/shards.py"},
    "revise": {"steps/revise.py", *ENGINE_FILES, "store/patch_tars.py", "store/shards.py", "text/sentences.py"},
    "summarize": {"steps/summarize.py", *ENGINE_FILES, "text/sentences.py", "text/tokens.py"},
    # clip_score: the CLIP's text features and the stored image features (models/clip imports device, fingerprint)
    "assemble": {"steps/assemble.py", "interop/pathgen_json.py", "models/clip.py", "models/device.py",
                 "models/fingerprint.py", "store/dataset.py", "store/embeddings.py", "store/io.py",
                 "store/manifest.py", "store/patch_tars.py", "store/shards.py", "store/status.py",
                 "store/tables.py", "wsi/quality.py"},
    "report": {"reporting/pages.py", "reporting/html.py", "store/dataset.py", "store/io.py", "store/seeds.py",
               "store/tables.py", "text/tokens.py"},
}
SHARED = ("wsi", "models", "text", "store")
SUBPACKAGES = ("steps", *SHARED, "lineage", "reporting", "interop", "demo")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path) -> set[str]:
    """The pathgen modules `path` imports, anywhere in the file (function-level imports included)."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pathgen"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pathgen"))
    return found


@pytest.mark.parametrize("step", sorted(STEP_FILES))
def test_code_hash_covers_exactly_the_files_the_step_depends_on(step):
    covered = {p.relative_to(PACKAGE_DIR).as_posix() for p in step_modules(step)}
    assert covered == STEP_FILES[step], {"added": covered - STEP_FILES[step], "dropped": STEP_FILES[step] - covered}


def test_code_hash_follows_every_engine_the_interface_can_build():
    from pathgen.lineage.codehash import DYNAMIC_IMPORTS
    from pathgen.models.engine import ENGINES

    assert set(DYNAMIC_IMPORTS["pathgen.models.engine"]) == {module for module, *_ in ENGINES.values()}


def test_every_hashed_step_is_stated_and_hashes_differ():
    assert set(STEP_MODULES) == set(STEP_FILES)
    assert len({code_hash(step) for step in STEP_FILES}) == len(STEP_FILES)


def test_model_steps_do_not_follow_slide_side_or_clip_code():
    """The edits the old flat layout turned into reruns of every caption/revise/summarize shard."""
    for step in ("caption", "revise", "summarize"):
        assert not any(f.startswith(("steps/prompts", "models/clip", "text/attributes", "wsi/"))
                       for f in STEP_FILES[step]), step


def test_no_step_module_imports_another_step():
    steps = {name for name in modules() if name.startswith("pathgen.steps.")}
    for name in sorted(steps):
        others = {m for m in imported(modules()[name]) if m.startswith("pathgen.steps")} - {name}
        assert not others, f"{name} imports {sorted(others)}"


def test_shared_subpackages_import_only_shared_code():
    allowed = ("pathgen.errors", "pathgen.config", *(f"pathgen.{p}" for p in SHARED))
    for name, path in modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in SHARED:
            bad = {m for m in imported(path) if not m.startswith(allowed)}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_only_the_cli_imports_every_step_and_nothing_imports_the_cli():
    every_step = {f"pathgen.steps.{s}" for s in STEP_FILES if s != "report"}
    importers = {name for name, path in modules().items() if every_step <= imported(path)}
    assert importers == {"pathgen.cli"}
    assert {name for name, path in modules().items() if "pathgen.cli" in imported(path)} == {"pathgen.__main__"}


def test_demo_code_is_imported_by_no_step_or_shared_module():
    for name, path in modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in ("steps", *SHARED, "interop", "reporting"):
            assert not {m for m in imported(path) if m.startswith("pathgen.demo")}, name


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_says_what_belongs_in_it(package):
    doc = ast.get_docstring(ast.parse((PACKAGE_DIR / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 10, package
