"""The demo's bytes do not depend on the CPU: its instruction set, its BLAS code path or its thread count.

One machine plays two: the session's own process (torch's native kernels, AVX2 or AVX-512; numpy's and
OpenBLAS's best code paths; two threads) and `OTHER_CPU`, where torch runs its scalar `default` kernels,
oneDNN and MKL stop at AVX2, numpy runs without its AVX-512 loops, OpenBLAS uses its Haswell kernels and
every job one thread. The project sets none of these variables: the bytes agree because every CPU
computation that becomes data runs in float64 (CLIP, LLaVA, k-means, scores) or in integers (the tiny
models' random weights), not because a code path is pinned. llama.cpp (summaries) is the exception: its
kernels are compiled for x86-64-v3 by the Makefile, which no variable here could change.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from conftest import BIN, TEST_SCALE, copy_project, run

OTHER_CPU = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL",
    "OPENBLAS_CORETYPE": "Haswell",
    "OMP_NUM_THREADS": "1",
}

PROBE = """
import hashlib, numpy as np, torch
from numpy._core._multiarray_umath import __cpu_features__
from pathgen.config import load_params
from pathgen.models.clip import encode_images, load_clip
params = load_params("params.yaml")
x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 336, 336)).astype(np.float32))
print(torch.backends.cpu.get_cpu_capability(), __cpu_features__["X86_V4"])  # V4: numpy's AVX-512 loops
for dtype in (torch.float32, torch.float64):
    features = encode_images(load_clip(params["clip"], "cpu", dtype=dtype), x)
    print(hashlib.sha256(features.astype(np.float16).tobytes()).hexdigest())
"""


def tree_hashes(root: Path, *dirs: str) -> dict[str, str]:
    """sha256 of every file under `dirs` of `root`, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted((root / d).rglob("*")) if p.is_file()}


def test_the_other_cpu_really_computes_differently(demo_inputs):
    """The control: under OTHER_CPU torch runs other kernels and numpy other loops, and a float32 CLIP
    forward pass gives other float16 features there; float64 gives the same ones."""
    native = run([str(BIN / "python"), "-c", PROBE], demo_inputs).stdout.split()
    other = run([str(BIN / "python"), "-c", PROBE], demo_inputs, env=OTHER_CPU).stdout.split()
    assert other[0] == "DEFAULT" and native[0] != "DEFAULT"
    assert other[1] == "False"
    assert native[2] != other[2]  # float32: the instruction set shows in the stored bytes
    assert native[3] == other[3]  # float64: it does not


def test_models_and_demo_are_the_same_bytes_on_another_cpu(built_demo, tmp_path):
    """`pathgen models tiny`, `pathgen demo` and the whole pipeline under OTHER_CPU (one core) give
    every model file and every file under data/ byte for byte as the session's own build."""
    other = copy_project(tmp_path / "other-cpu")
    run([str(BIN / "pathgen"), "models", "tiny", "--out", "models"], other, env=OTHER_CPU)
    run([str(BIN / "pathgen"), "demo", "--root", ".", "--scale", str(TEST_SCALE)], other, env=OTHER_CPU)
    run([str(BIN / "snakemake"), "--cores", "1"], other, env=OTHER_CPU, timeout=1800)
    expected, got = tree_hashes(built_demo, "models", "data"), tree_hashes(other, "models", "data")
    assert any(path.startswith("data/dataset/") for path in expected)  # the whole pipeline was compared
    assert sorted(got) == sorted(expected)
    assert [path for path in expected if got[path] != expected[path]] == []
    shutil.rmtree(other)
