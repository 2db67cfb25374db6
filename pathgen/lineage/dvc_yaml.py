"""dvc.yaml from the Snakefile: one DVC stage per step, so both engines run one DAG.

The Snakefile is the source of truth. This module loads it through Snakemake's
API, builds its DAG for the current manifest and groups the rules by the rule
file that defines them (`rules/<step>.smk`): one stage per step. A stage

- runs `snakemake --until <its rules>`, i.e. Snakemake builds that step's
  missing or outdated jobs and nothing downstream;
- depends on the directories of the upstream steps it reads, on the
  external inputs its jobs read (slides, reports, model checkpoints, grouped
  by their top directory: `data/demo`, `models/tiny-clip`), on the manifest,
  on the step's code (the files `pathgen.lineage.codehash` hashes for the rule's
  `code` param, plus its rule file) and on the step's params.yaml sections;
- outputs the directories its rules write, `persist: true` so that DVC never
  deletes them before the command and Snakemake rebuilds only what is missing.

The assembled dataset's `metrics.json` and `plots/*.csv` become DVC's
top-level metrics and plots, so `dvc metrics diff` / `dvc plots diff` compare
two versions. Run `pathgen dvc-yaml` after changing the Snakefile, a rule, a
step's imports, or where the manifest, slides or models live; `--check` fails
when the committed file is stale (a test runs it).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from pathgen.config import STEP_SECTIONS, load_params
from pathgen.errors import PathgenError
from pathgen.lineage.codehash import PACKAGE_DIR, step_modules, steps_for_hash
from pathgen.store.dataset import METRICS_NAME, PLOTS
from pathgen.store.io import write_text

HEADER = """\
# Generated from the Snakefile by `pathgen dvc-yaml`: do not edit by hand, regenerate.
# One stage per step (rules/<step>.smk). Each stage runs Snakemake for that step's
# jobs only; its outs persist, so Snakemake inside rebuilds only what is missing.
# Build with `snakemake` (locally or --profile slurm), record with `dvc commit`;
# `dvc repro` / `pathgen audit` re-executes the same commands for an audit.
"""


@dataclass
class Stage:
    """One step of the DAG as DVC sees it."""

    name: str
    rules: list[str] = field(default_factory=list)
    outs: set[str] = field(default_factory=set)
    deps: set[str] = field(default_factory=set)
    code: set[str] = field(default_factory=set)
    steps: list[str] = field(default_factory=list)
    upstream: set[str] = field(default_factory=set)
    rule_deps: dict[str, set[str]] = field(default_factory=dict)
    shard_wise: bool = False


def _data_root(path: str, root: Path) -> str:
    """The unit DVC tracks for a file: its directory under data/ or models/ (`data/tiles`), else the file."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            return str(Path(path).parent)  # outside the repo: its folder, as an absolute path
    parts = PurePosixPath(p.as_posix()).parts
    if len(parts) >= 3 and parts[0] in ("data", "models"):
        return "/".join(parts[:2])
    return p.as_posix()


def _load_dag(root: Path) -> Any:
    """Snakemake's DAG of every job of the workflow in `root` (as if nothing were built)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import DAGSettings, OutputSettings, Quietness, ResourceSettings

    logging.getLogger("snakemake.logging").propagate = False  # its progress lines are noise here
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=root / "Snakefile",
                                    workdir=root)
        workflow_api.dag(DAGSettings(forceall=True))
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return workflow.dag


def collect_stages(root: str | Path = ".") -> tuple[list[Stage], dict[str, Any]]:
    """The stages of the workflow in `root`, in rule-file order, and the validated params.yaml."""
    root = Path(root)
    params = load_params(root / "params.yaml")
    try:
        dag = _load_dag(root)
    except Exception as exc:  # Snakemake reports parse and DAG errors as exceptions of its own
        raise PathgenError(f"dvc-yaml: Snakemake could not build the DAG of {root / 'Snakefile'}: {exc}") from None

    stages: dict[str, Stage] = {}
    producer: dict[str, str] = {}
    rule_index = {rule.name: i for i, rule in enumerate(dag.workflow.rules)}
    jobs = sorted((j for j in dag.jobs if Path(j.rule.snakefile).parent.name == "rules"),
                  key=lambda j: (rule_index[j.rule.name], sorted(map(str, j.output))))
    def stage_of(job: Any) -> str:  # rule files define the stages
        return Path(job.rule.snakefile).stem

    for job in jobs:
        stage = stages.setdefault(stage_of(job), Stage(stage_of(job)))
        if job.rule.name not in stage.rules:
            stage.rules.append(job.rule.name)
            code = getattr(job.rule.params, "code", None)
            steps = steps_for_hash(code) if isinstance(code, str) else None
            if not steps:
                raise PathgenError(f"dvc-yaml: rule '{job.rule.name}' ({job.rule.snakefile}) has no "
                                   "`code=code_hash(step, ...)` param")
            stage.steps.extend(steps)
            stage.code.update(p.relative_to(PACKAGE_DIR.parent).as_posix() for step in steps for p in step_modules(step))
            stage.code.add(Path(job.rule.snakefile).relative_to(root.resolve()).as_posix())
        stage.shard_wise |= "shard" in job.wildcards_dict
        for out in job.output:
            producer[str(out)] = stage.name
            stage.outs.add(_data_root(str(out), root))
    for job in jobs:
        stage = stages[stage_of(job)]
        stage.rule_deps.setdefault(job.rule.name, set()).update(dep.rule.name for dep in dag.dependencies[job])
        for path in job.input:
            owner = producer.get(str(path))  # None: an external input (slide, report, checkpoint)
            if owner != stage.name:
                stage.deps.add(_data_root(str(path), root))
            if owner not in (None, stage.name):
                stage.upstream.add(owner)

    order = _topological([s for s in stages.values()], [Path(r.snakefile).stem for r in dag.workflow.rules])
    for stage in order:  # shard-wise anywhere upstream makes the stage depend on `shards`
        stage.shard_wise |= any(stages[u].shard_wise for u in stage.upstream)
    return order, params


def _topological(stages: list[Stage], file_order: list[str]) -> list[Stage]:
    rank = {name: i for i, name in reversed(list(enumerate(file_order)))}
    todo = sorted(stages, key=lambda s: rank.get(s.name, len(rank)))
    done: list[Stage] = []
    names: set[str] = set()
    while todo:
        ready = next(s for s in todo if s.upstream <= names)
        todo.remove(ready)
        done.append(ready)
        names.add(ready.name)
    return done


def until_rules(stage: Stage) -> list[str]:
    """The stage's last rules: `--until` stops at the first listed rule it reaches, so only these are named."""
    needed = {dep for deps in stage.rule_deps.values() for dep in deps}
    return [rule for rule in stage.rules if rule not in needed]


def stage_params(stage: Stage) -> list[str]:
    """The params.yaml keys a stage depends on: the manifest, its steps' sections, `shards` if shard-wise."""
    keys = ["manifest", *(key for step in stage.steps for key in STEP_SECTIONS.get(step, ()))]
    if stage.shard_wise:
        keys.append("shards")
    return list(dict.fromkeys(keys))


def dvc_pipeline(root: str | Path = ".") -> dict[str, Any]:
    """The content of dvc.yaml for the workflow in `root`."""
    stages, params = collect_stages(root)
    manifest = params["manifest"]
    out: dict[str, Any] = {"stages": {}}
    for stage in stages:
        deps = sorted(stage.deps | {manifest}) + sorted(stage.code)
        out["stages"][stage.name] = {
            "cmd": "snakemake --until " + " ".join(until_rules(stage)),
            "deps": deps,
            "params": stage_params(stage),
            "outs": [{path: {"persist": True}} for path in sorted(stage.outs)],
        }
    dataset = next((s for s in stages if any(o.endswith("dataset") for o in s.outs)), None)
    if dataset is not None:
        base = next(o for o in sorted(dataset.outs) if o.endswith("dataset"))
        out["metrics"] = [f"{base}/{METRICS_NAME}"]
        out["plots"] = [{f"{base}/plots/{name}": {"x": x, "y": y}} for name, (x, y) in PLOTS.items()]
    return out


def render(pipeline: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(pipeline, sort_keys=False, width=120)


def stale_lock_stages(root: str | Path = ".") -> list[str]:
    """Stages dvc.lock still records but dvc.yaml no longer has (DVC keeps them until the lock is rewritten)."""
    root = Path(root)
    if not (root / "dvc.lock").is_file() or not (root / "dvc.yaml").is_file():
        return []
    locked = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}
    current = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    return sorted(set(locked) - set(current))


def write_dvc_yaml(root: str | Path = ".", check: bool = False) -> bool:
    """Write `root/dvc.yaml` (or with `check`, compare). True when the file on disk is current."""
    root = Path(root)
    text = render(dvc_pipeline(root))
    path = root / "dvc.yaml"
    current = path.read_text() if path.is_file() else ""
    if current == text:
        return True
    if check:
        diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                            "dvc.yaml (on disk)", "dvc.yaml (from the Snakefile)"))
        raise PathgenError(f"dvc.yaml is stale: run `pathgen dvc-yaml` and commit it\n{diff}")
    write_text(text, path)
    return False
