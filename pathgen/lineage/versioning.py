"""Snakemake and DVC on one workspace: `pathgen sync` and `pathgen audit`.

`sync`: after `dvc checkout` / `dvc pull` every file has a new mtime, and
Snakemake (which trusts mtimes, and checksums only small files) would plan the
whole DAG again. When `dvc status` says the workspace matches dvc.lock,
the outputs are exactly what the recorded code, params and inputs produce, so
`snakemake --touch` may safely mark them up to date.

`audit`: clone a revision into a temporary directory, check out only the
DVC-tracked inputs (`*.dvc` files: slides, reports, manifest, checkpoints) and
run `dvc repro` from nothing, in one of two modes:

* `exact`: model answers come from the repository's item cache, whose entries
  are first checked against their content hashes (`pathgen.store.cache.verify`);
  every other step runs again, and the rebuilt `dvc.lock` must equal the
  committed one byte for byte. This is the audit of a CPU-built dataset, and of
  the deterministic steps of any dataset.
* `recompute`: the item cache is left out, so every model call is made again.
  GPUs of another type, another batch composition or another driver do not
  reproduce float16 generation bit for bit, so the verdict is the dataset diff
  of the committed and the rebuilt `data/dataset`: no patch image may change
  (images come from deterministic steps only), and at most `max_changed` of the
  committed pairs may be added, removed or re-captioned. How much the changed
  captions changed (the share of their words) is reported beside.
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


AUDIT_MODES = ("exact", "recompute")
DEFAULT_MAX_CHANGED = 0.01  # recompute: share of the committed pairs that may differ (README "Versions and audits")
CACHE_ENV = "PATHGEN_CACHE_ROOT"  # read by rules/common.smk: the item cache root the audit's rebuild uses


@dataclass
class AuditResult:
    """What `pathgen audit` found: the stages rebuilt, any output whose hash moved, and (recompute) the
    dataset diff with its verdict."""

    rev: str
    stages: list[str]
    differences: list[str] = field(default_factory=list)
    workdir: Path | None = None
    mode: str = "exact"
    cache: dict[str, Any] | None = None  # exact: verify() of the source cache, plus its "root"
    recomputed: int = 0  # model answers computed during the rebuild (cache items written)
    diff: dict[str, Any] | None = None  # recompute: the dataset diff report, plus "word_change"
    max_changed: float = DEFAULT_MAX_CHANGED
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


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


def _mirror_cache(source: Path, mirror: Path) -> None:
    """A cache at `mirror` whose segments are links to those of `source` (segments are immutable:
    a writer only adds files), so the rebuild reads every stored answer and writes what it computes
    beside them, never into `source`."""
    from pathgen.store.cache import FINGERPRINT_FILE, _fingerprint_dirs, _list_segments

    for agent, directory in _fingerprint_dirs(source, None):
        target = mirror / agent / directory.name
        target.mkdir(parents=True, exist_ok=True)
        if (directory / FINGERPRINT_FILE).is_file():
            shutil.copyfile(directory / FINGERPRINT_FILE, target / FINGERPRINT_FILE)
        for name, _ in _list_segments(directory):
            (target / name).symlink_to((directory / name).resolve())


def _written_items(cache_root: Path) -> int:
    """Items in the segments written under `cache_root` (regular files; linked segments are not counted)."""
    from pathgen.store.cache import SEGMENT_GLOB

    if not cache_root.is_dir():
        return 0
    return sum(sum(1 for _ in seg.open("rb")) for seg in sorted(cache_root.glob(f"*/*/{SEGMENT_GLOB}"))
               if not seg.is_symlink())


def judge_diff(report: dict[str, Any], max_changed: float) -> list[str]:
    """The recompute verdict on a dataset diff report: one line per failed condition ([] passes)."""
    counts = report["counts"]
    failures = []
    if counts["image_changed"]:
        failures.append(f"{counts['image_changed']} pair(s) have another patch image: images come from "
                        "deterministic steps, so a model rerun never changes one")
    changed = len(set(report["keys"]["added"]) | set(report["keys"]["removed"]) | set(report["keys"]["caption_changed"]))
    allowed = max_changed * counts["pairs_a"]
    if changed > allowed:
        failures.append(f"{changed} of {counts['pairs_a']} pairs changed (added, removed or re-captioned), "
                        f"more than the tolerance of {max_changed:.2%} ({int(allowed)} pairs)")
    return failures


def recompute_diff(clone: Path, rev: str) -> dict[str, Any]:
    """The dataset diff of `rev`'s committed dataset (from the DVC cache) and the clone's rebuilt one, with
    `word_change`: how many captions changed and the mean and largest share of their words that did."""
    import polars as pl

    from pathgen.lineage.diff import diff_manifests, open_version, word_change

    with open_version(clone, rev) as committed, open_version(clone, None) as rebuilt:
        report = diff_manifests(committed.manifest, rebuilt.manifest, rev, "rebuilt", examples=3)
        keys = report["keys"]["caption_changed"]
        old, new = (dict(v.manifest.filter(pl.col("key").is_in(keys)).select("key", "summary").iter_rows())
                    for v in (committed, rebuilt))
    changes = [word_change(old[k], new[k]) for k in keys]
    report["word_change"] = {"captions": len(changes), "mean": round(sum(changes) / len(changes), 4) if changes else 0.0,
                             "max": round(max(changes), 4) if changes else 0.0}
    return report


def format_audit(result: AuditResult) -> str:
    """What `pathgen audit` prints: what was rebuilt and how, what was compared, and the verdict."""
    head = f"pathgen audit --mode {result.mode}: {result.rev}"
    lines = []
    if result.mode == "exact" and result.cache is not None:
        c = result.cache
        lines.append(f"{head}: item cache {c['root']}: {c['segments']} segments, {c['items']} items checked "
                     f"against their content hashes, {len(c['problems'])} problem(s)")
    if result.stages:
        how = ("model answers from the item cache" if result.mode == "exact" else
               "an empty item cache, so every model call was made again")
        lines.append(f"{head}: dvc repro from the tracked inputs rebuilt {len(result.stages)} stages with {how}; "
                     f"{result.recomputed} model answers computed")
        lines.append(f"{head}: dvc.lock is byte-identical" if not result.differences else
                     f"{head}: {len(result.differences)} output(s) of dvc.lock moved:\n" +
                     "\n".join(f"  {line}" for line in result.differences))
    if result.diff is not None:
        c, w = result.diff["counts"], result.diff["word_change"]
        lines.append(f"{head}: dataset diff, committed -> rebuilt: {c['pairs_a']} -> {c['pairs_b']} pairs; "
                     f"added {c['added']}, removed {c['removed']}, caption changed {c['caption_changed']} "
                     f"(mean {w['mean']:.1%} of their words, at most {w['max']:.1%}), image changed "
                     f"{c['image_changed']}, unchanged {c['unchanged']}; tolerance {result.max_changed:.2%} of the pairs")
    if result.passed:
        lines.append(f"{head}: passed")
    else:
        lines.append(f"{head}: FAILED")
        lines += [f"  {line}" for line in result.failures if line not in result.differences]  # those are above
    return "\n".join(lines)


def audit(repo: str | Path = ".", rev: str = "HEAD", keep: str | Path | None = None,
          remote: str | None = None, mode: str = "exact", max_changed: float = DEFAULT_MAX_CHANGED) -> AuditResult:
    """Rebuild `rev` of `repo` from its DVC-tracked inputs alone in a fresh clone and judge it by `mode`
    (module docstring): `exact` compares the dvc.locks byte for byte, with model answers from the
    verified item cache; `recompute` makes every model call again and judges the dataset diff."""
    if mode not in AUDIT_MODES:
        raise PathgenError(f"pathgen audit: --mode must be one of {', '.join(AUDIT_MODES)}, got '{mode}'")
    if not 0.0 <= max_changed <= 1.0:
        raise PathgenError(f"pathgen audit: --max-changed must be a share between 0 and 1, got {max_changed}")
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
        item_cache = workdir / "item-cache"
        result = AuditResult(rev, [], workdir=workdir if keep else None, mode=mode, max_changed=max_changed)
        if mode == "exact":
            params = yaml.safe_load((clone / "params.yaml").read_text()) or {}
            source = Path(os.environ.get(CACHE_ENV) or (params.get("cache") or {}).get("root") or "cache")
            source = source if source.is_absolute() else repo / source
            from pathgen.store.cache import verify

            result.cache = verify(source) if source.is_dir() else {"segments": 0, "items": 0, "bytes": 0, "problems": []}
            result.cache["root"] = str(source)
            result.failures += [f"item cache: {line}" for line in result.cache["problems"]]
            if result.failures:
                return result  # a damaged cache would serve answers that no key vouches for
            if source.is_dir():
                _mirror_cache(source, item_cache)
        item_cache.mkdir(exist_ok=True)  # recompute: empty, so every model call is made again
        # The clone's own code runs its stages, not the installed package.
        env = _env({"PYTHONPATH": os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")])),
                    CACHE_ENV: str(item_cache)})
        _run([tool("dvc"), "repro", "--no-run-cache"], clone, "pathgen audit: dvc repro", env=env, capture=False)
        rebuilt = (clone / "dvc.lock").read_text()
        result.stages = sorted((yaml.safe_load((clone / "dvc.yaml").read_text()) or {}).get("stages", {}))
        result.differences = lock_differences(committed, rebuilt)
        result.recomputed = _written_items(item_cache)
        if mode == "exact":
            result.failures += result.differences
        else:
            result.diff = recompute_diff(clone, rev)
            result.failures += judge_diff(result.diff, max_changed)
        return result
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
