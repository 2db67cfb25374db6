"""Starting and watching the real servers the engine tests talk to (shared by test_engines_server and
test_model_jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def start(argv: list[str], log: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    """A server started the way a user would (not by the engine), once it answers."""
    env = dict(os.environ, **OFFLINE)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{argv} not ready: {log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve_llava(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve <LLaVA dir>` on a free port, as a user starts it: (process, base URL)."""
    from pathgen.models.server import free_port

    port = free_port()
    binary = Path(sys.executable).parent / "transformers"
    proc = start([str(binary), "serve", str(model_dir), "--port", str(port), "--device", "cpu"], log, port)
    return proc, f"http://127.0.0.1:{port}/v1"


def serve_gguf(gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server (`python -m llama_cpp.server`) for a GGUF on a free port: (process, base URL)."""
    from pathgen.models.server import free_port

    port = free_port()
    proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                  "--n_ctx", "2048"], log, port)
    return proc, f"http://127.0.0.1:{port}/v1"


# Module-scoped fixtures (import them into a test module); each needs the module's `models` fixture:
# {"llava": tiny LLaVA directory, "gguf": tiny GGUF file}.
@pytest.fixture(scope="module")
def transformers_serve(models, tmp_path_factory):
    """`transformers serve <tiny llava>`: the URL and the model name it answers to (the path it was given)."""
    proc, url = serve_llava(models["llava"], tmp_path_factory.mktemp("ts") / "serve.log")
    yield url, str(models["llava"])
    stop(proc)


@pytest.fixture(scope="module")
def llama_server(models, tmp_path_factory):
    proc, url = serve_gguf(models["gguf"], tmp_path_factory.mktemp("lc") / "server.log")
    yield url
    stop(proc)
