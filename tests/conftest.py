"""Shared fixtures: a temporary copy of the project with tiny models and small demo slides."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["Snakefile", "rules", "params.yaml", "profiles"]
TEST_SCALE = 0.35  # demo slides with ~40-60 tissue patches each


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH; fail with its output when `check` and it fails."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def snakemake(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "snakemake"), "--cores", "2", *args], cwd, check=check)


def planned_jobs(cwd: Path) -> dict[str, int]:
    """Rule -> job count of what `snakemake -n` would run (empty when nothing)."""
    out = snakemake(cwd, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if match and match.group(1) not in ("total", "job", "count"):
            counts[match.group(1)] = int(match.group(2))
    return counts


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory) -> Path:
    """A project copy with tiny models and small demo slides, not yet built (do not modify)."""
    root = copy_project(tmp_path_factory.mktemp("demo-inputs"))
    run([str(BIN / "pathgen"), "models", "tiny", "--out", "models"], root)
    run([str(BIN / "pathgen"), "demo", "--root", ".", "--scale", str(TEST_SCALE)], root)
    return root


@pytest.fixture(scope="session")
def built_demo(demo_inputs, tmp_path_factory) -> Path:
    """The demo inputs built through the patches step by snakemake (do not modify)."""
    root = tmp_path_factory.mktemp("built-demo") / "project"
    shutil.copytree(demo_inputs, root, symlinks=True)
    snakemake(root)
    return root


@pytest.fixture
def project_copy(tmp_path):
    """A function copying a prepared project (keeping mtimes) into this test's tmp dir."""

    def _copy(src: Path) -> Path:
        dest = tmp_path / "project"
        shutil.copytree(src, dest, symlinks=True)
        return dest

    return _copy
