"""Shared fixtures: a temporary copy of the project with tiny models and small demo slides."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["Snakefile", "rules", "params.yaml", "profiles", "report"]
TEST_SCALE = 0.35  # demo slides with ~40-60 tissue patches each


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH (plus `env`); fail with its output when `check` and it fails."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1", **(env or {}))
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


# Smaller generation budgets keep the suite's model time down; every code path stays the same. Revise keeps
# room for every answer its (smaller) schema admits, so constrained answers are never cut: 2 ops of at most
# 2 * 80 characters + JSON fit in 384 tokens.
TEST_PARAMS = {"describe": {"max_new_tokens": 32},
               "revise": {"max_new_tokens": 384, "max_ops": 2, "max_sentence_chars": 80},
               "summarize": {"max_tokens": 48}}


def copy_project(dest: Path) -> Path:
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TEST_PARAMS.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
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


def train_open_clip(tmp_path: Path, train_data: str, samples: int, checkpoint: Path, batch_size: int = 8) -> str:
    """Train the tiny CLIP one epoch with open_clip's own trainer (the installed package, unchanged),
    offline on CPU; assert it ran and its losses are finite; return its log."""
    from pathgen.demo.tiny_models import TINY_CLIP_CONFIG

    # open_clip's `local-dir:` model schema: a folder with open_clip_config.json {"model_cfg": ...} and weights.
    model_dir = tmp_path / "tiny-clip-local"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    shutil.copyfile(checkpoint, model_dir / "open_clip_pytorch_model.bin")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "open_clip_train.main",
           "--train-data", train_data, "--dataset-type", "webdataset",
           "--train-num-samples", str(samples), "--batch-size", str(batch_size), "--epochs", "1", "--workers", "0",
           "--model", f"local-dir:{model_dir}", "--lr", "1e-4", "--warmup", "0", "--precision", "fp32",
           "--save-frequency", "1", "--log-every-n-steps", "1", "--logs", str(logs), "--name", "run",
           "--device", "cpu", "--seed", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = (logs / "run" / "out.log").read_text() if (logs / "run" / "out.log").is_file() else ""
    # The trainer exits 0 even when it did nothing: the checkpoint is the proof it trained.
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert (logs / "run" / "checkpoints" / "epoch_1.pt").is_file(), f"{log}\n{proc.stderr}"
    losses = [float(v) for v in re.findall(r"Contrastive_loss: ([-+0-9.eEnaif]+)", log)]
    assert losses and all(math.isfinite(v) for v in losses), log
    return log


def forbid_clip_loading(monkeypatch) -> None:
    """From here on, building a CLIP or hashing a checkpoint fails the test (a fresh job's process: the
    in-process hash memo is emptied, so a hash must come from the hash store)."""
    from pathgen.models import fingerprint

    def no_clip(*args, **kwargs):
        raise AssertionError("the CLIP was loaded")

    def no_hashing(*args, **kwargs):
        raise AssertionError("the checkpoint was hashed again")

    monkeypatch.setattr("pathgen.models.clip.load_clip", no_clip)
    monkeypatch.setattr(fingerprint, "_known", {})
    monkeypatch.setattr(fingerprint, "sha256_file", no_hashing)


@pytest.fixture(scope="session")
def random_tiny_clip(tmp_path_factory) -> dict:
    """params.yaml's `clip` section for the tiny CLIP's architecture with plain random weights (what
    `pathgen models tiny` adds, an image calibration of ~40 s on 2 cores, only shapes image features;
    for steps that encode texts)."""
    import open_clip
    import torch

    from pathgen.demo.tiny_models import TINY_CLIP_CONFIG, TINY_CLIP_NAME

    out = tmp_path_factory.mktemp("random-tiny-clip")
    config = out / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = out / "open_clip_model.pt"
    torch.save(open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=True).state_dict(), checkpoint)
    return {"model": TINY_CLIP_NAME, "checkpoint": str(checkpoint), "config": str(config),
            "force_quick_gelu": True, "input_size": 336}
