"""Snakemake and DVC on one workspace: `pathgen sync` and `pathgen audit`.

`sync`: after `dvc checkout` / `dvc pull` every file has a new mtime, and
Snakemake (which trusts mtimes, and checksums only small files) would plan the
whole DAG again. When `dvc status` says the workspace matches dvc.lock,
the outputs are exactly what the recorded code, params and inputs produce, so
`snakemake --touch` may safely mark them up to date.

`audit`: clone a revision into a temporary directory, check out only the
DVC-tracked inputs (`*.dvc` files: slides, reports, manifest, checkpoints),
run `dvc repro` from nothing, and require the rebuilt `dvc.lock` to equal the
committed one byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pathgen.errors import PathgenError

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of this environment (snakemake, dvc), else whatever PATH finds."""
    path = BIN / name
    return str(path) if path.is_file() else name


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    env.update(extra or {})
    return env


def _run(cmd: list[str], cwd: Path, what: str, env: dict[str, str] | None = None,
         capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-30:])
        raise PathgenError(f"{what}: `{' '.join(cmd)}` exited {proc.returncode}" + (f"\n{tail}" if tail else ""))
    return proc


def dvc_status(root: str | Path = ".") -> dict[str, Any]:
    """`dvc status --json` of the repo at `root`: {} when every stage and tracked file is in line."""
    proc = _run([tool("dvc"), "status", "--json"], Path(root), "dvc status")
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith(("{", "["))]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        raise PathgenError(f"dvc status: unexpected output:\n{proc.stdout}") from None


def describe_status(status: dict[str, Any]) -> str:
    """One line per stage or file that is not in line, as `dvc status` says it."""
    lines = []
    for name, changes in sorted(status.items()):
        parts = []
        for change in changes if isinstance(changes, list) else [changes]:
            if isinstance(change, str):
                parts.append(change)
            else:
                for kind, items in change.items():
                    parts.append(f"{kind}: " + ", ".join(f"{k} ({v})" for k, v in sorted(items.items()))
                                 if isinstance(items, dict) else f"{kind}: {items}")
        lines.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(lines)


def sync(root: str | Path = ".") -> int:
    """Mark Snakemake's outputs up to date after a DVC checkout; the number of files touched.

    Refuses (PathgenError) unless `dvc status` is clean: touching would otherwise
    hide real changes.
    """
    root = Path(root)
    status = dvc_status(root)
    if status:
        raise PathgenError("pathgen sync: the workspace does not match dvc.lock, so Snakemake's view cannot be "
                           "brought in line safely:\n" + describe_status(status) +
                           "\nRun `dvc checkout` (or `dvc pull`) for a recorded version, or build with `snakemake` "
                           "and record it with `dvc commit`.")
    proc = _run([tool("snakemake"), "--touch", "--cores", "1", "--quiet", "rules"], root, "pathgen sync")
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("Touching output file"))


@dataclass
class AuditResult:
    """What `pathgen audit` found: the stages rebuilt and any output whose hash moved."""

    rev: str
    stages: list[str]
    differences: list[str] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.differences


def _lock_outs(text: str) -> dict[str, dict[str, str]]:
    """stage -> {out path: md5} from a dvc.lock's text."""
    lock = yaml.safe_load(text) or {}
    return {name: {o["path"]: o.get("md5", "") for o in stage.get("outs", [])}
            for name, stage in (lock.get("stages") or {}).items()}


def lock_differences(committed: str, rebuilt: str) -> list[str]:
    """Human lines naming each stage output whose recorded hash differs between two dvc.lock texts."""
    old, new = _lock_outs(committed), _lock_outs(rebuilt)
    lines = []
    for stage in sorted(set(old) | set(new)):
        for path in sorted(set(old.get(stage, {})) | set(new.get(stage, {}))):
            a, b = old.get(stage, {}).get(path), new.get(stage, {}).get(path)
            if a != b:
                lines.append(f"{stage}: {path}: committed {a or '(none)'}, rebuilt {b or '(none)'}")
    if not lines and committed != rebuilt:
        lines.append("dvc.lock differs outside the outputs (deps or params): see `git diff dvc.lock` in the clone")
    return lines


def audit(repo: str | Path = ".", rev: str = "HEAD", keep: str | Path | None = None,
          remote: str | None = None) -> AuditResult:
    """Rebuild `rev` of `repo` from its DVC-tracked inputs alone and compare the new dvc.lock with the committed one."""
    repo = Path(_run(["git", "rev-parse", "--show-toplevel"], Path(repo), "pathgen audit").stdout.strip())
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pathgen-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    clone = workdir / "repo"
    if clone.exists():
        raise PathgenError(f"pathgen audit: {clone} already exists; pass an empty --keep directory")
    try:
        _run(["git", "clone", "--quiet", "--no-checkout", str(repo), str(clone)], workdir, "pathgen audit")
        _run(["git", "checkout", "--quiet", rev], clone, f"pathgen audit: revision '{rev}'")
        if not (clone / "dvc.lock").is_file():
            raise PathgenError(f"pathgen audit: {rev} has no dvc.lock; build it, run `dvc commit` and commit dvc.lock")
        committed = (clone / "dvc.lock").read_text()
        cache = _run([tool("dvc"), "cache", "dir"], repo, "pathgen audit").stdout.strip().splitlines()[-1]
        _run([tool("dvc"), "config", "--local", "cache.dir", cache], clone, "pathgen audit")
        inputs = _run(["git", "ls-files", "*.dvc"], clone, "pathgen audit").stdout.split()
        if inputs:
            fetch = [tool("dvc"), "pull", "--remote", remote] if remote else [tool("dvc"), "checkout"]
            _run(fetch + inputs, clone, "pathgen audit: the DVC-tracked inputs are not all in the cache "
                 "(run `dvc commit` or `dvc push` in the source repo)")
        # The clone's own code runs its stages, not the installed package.
        env = _env({"PYTHONPATH": os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")]))})
        _run([tool("dvc"), "repro", "--no-run-cache"], clone, "pathgen audit: dvc repro", env=env, capture=False)
        rebuilt = (clone / "dvc.lock").read_text()
        stages = sorted((yaml.safe_load((clone / "dvc.yaml").read_text()) or {}).get("stages", {}))
        return AuditResult(rev, stages, lock_differences(committed, rebuilt), workdir if keep else None)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
