"""A model server launched for the length of a job (the openai engine's `launch:` setting).

`launch_server` picks a free port on 127.0.0.1, fills in the command
template (placeholders `{checkpoint}` `{port}` `{host}` `{model}` `{python}`;
the values are shell-quoted, the command split with `shlex`, never run by a
shell; a literal brace is written `{{` / `}}`), starts it in its own session
with stdout and stderr going to `{log_dir}/{what}-server.log`, and waits until
`GET /health` (or, where the server has none, `GET /v1/models`) answers 200.
A server that exits while starting fails at once, naming its exit code, its
log and the log's last lines.

A launched server is stopped (SIGTERM to its process group, SIGKILL after a
grace period) by `Server.stop`, at interpreter exit, and on SIGTERM to this
process (a SLURM cancel): the handler is chained with whatever handler was
installed before or after it (the item cache installs one that flushes), so
both run. Where the platform has it, the server also gets SIGKILL when the
thread that launched it dies (Linux PR_SET_PDEATHSIG), so a job killed by
SIGKILL leaves no server behind either.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pathgen.errors import ModelError
from pathgen.store.shutdown import on_shutdown

HOST = "127.0.0.1"
STOP_GRACE_S = 5.0      # SIGTERM, then this long, then SIGKILL
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 5
# Health polls go to 127.0.0.1 directly, whatever http_proxy says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on `port` now (as servers do, with SO_REUSEADDR: TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def format_command(template: str, checkpoint: str | Path, port: int, model: str, host: str = HOST) -> list[str]:
    """The argv of a launch template: placeholders filled with shell-quoted values, then `shlex.split`."""
    values = {"checkpoint": str(checkpoint), "port": str(port), "host": host, "model": model,
              "python": sys.executable}
    try:
        text = template.format(**{k: shlex.quote(v) for k, v in values.items()})
        argv = shlex.split(text)
    except KeyError as exc:
        raise ModelError(f"launch template {template!r} has an unknown placeholder {{{exc.args[0]}}}; "
                         f"known: {', '.join('{' + k + '}' for k in values)}") from None
    except (ValueError, IndexError) as exc:
        raise ModelError(f"launch template {template!r} cannot be parsed: {exc}") from None
    if not argv:
        raise ModelError("launch template is empty")
    return argv


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-empty lines of a log, joined with ' | ' (an error message stays one line)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _exit_status(proc: subprocess.Popen) -> int | None:
    """The process's exit code (negative: killed by that signal) if it has exited, else None.

    The child is not reaped (WNOWAIT): while it is a zombie its pid, and so its
    process group id, cannot be reused, so signalling the group stays safe.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function giving the child SIGKILL when its parent thread dies (Linux), else None."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG follows the launching *thread*: only the main thread lives as long as the job
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Server:
    """A launched server process: its URL, log and how to stop it."""

    def __init__(self, proc: subprocess.Popen, argv: list[str], port: int, log_path: Path, what: str):
        self.proc = proc
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.what = what
        self.base_url = f"http://{HOST}:{port}"
        self.owner_pid = os.getpid()  # a forked child must not stop its parent's server

    @property
    def url(self) -> str:
        """The OpenAI API base (what the client is given)."""
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_status(self) -> int | None:
        """None while it runs; its exit code once it has exited (negative: the signal that killed it)."""
        return _exit_status(self.proc)

    def describe_exit(self) -> str | None:
        """'the server it launched exited with code N (log: ...)' once it has exited, else None."""
        code = self.exit_status()
        if code is None:
            return None
        return f"the server it launched exited with code {code} (log: {self.log_path})"

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /health, else /v1/models, until 200; fail early when the process exits."""
        deadline = time.monotonic() + timeout_s
        paths = ["/health", "/v1/models"]
        while True:
            code = self.exit_status()
            if code is not None:
                tail = log_tail(self.log_path)
                self.stop()
                raise ModelError(f"{self.what}: the server launched by `{shlex.join(self.argv)}` exited with code "
                                 f"{code} before it was ready (log: {self.log_path})" + (f": {tail}" if tail else ""))
            for path in list(paths):
                try:
                    with _NO_PROXY.open(self.base_url + path, timeout=5) as response:
                        if response.status == 200:
                            return
                except urllib.error.HTTPError as exc:
                    if exc.code == 404 and path == "/health" and len(paths) > 1:
                        paths.remove(path)  # no /health on this server: ask /v1/models from now on
                        continue
                except (OSError, ValueError):
                    pass  # not listening yet
                break
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise ModelError(f"{self.what}: the server launched by `{shlex.join(self.argv)}` was not ready after "
                                 f"{timeout_s:g} s (log: {self.log_path})" + (f": {tail}" if tail else ""))
            time.sleep(POLL_INTERVAL_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; its exit code. Idempotent."""
        _LIVE.pop(id(self), None)
        if self.proc.returncode is not None:
            return self.proc.returncode
        if self.exit_status() is None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.exit_status() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        self._signal_group(signal.SIGKILL)  # what is left of the group (the leader's children too)
        try:
            return self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)  # start_new_session: the group id is the server's pid
        except (ProcessLookupError, PermissionError):
            pass


def launch_server(template: str, checkpoint: str | Path, model: str, what: str,
                  log_dir: str | Path | None = None, startup_timeout_s: float = 600.0) -> Server:
    """Start the server a launch template describes and wait until it answers; see the module docstring."""
    port = free_port()
    argv = format_command(template, checkpoint, port, model)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(log_dir) / f"{what}-server.log"
    else:
        fd, name = tempfile.mkstemp(prefix=f"{what}-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    on_shutdown(stop_all)
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as exc:
            raise ModelError(f"{what}: cannot launch the server `{shlex.join(argv)}`: {exc.strerror or exc}") from None
    server = Server(proc, argv, port, log_path, what)
    _LIVE[id(server)] = server
    server.wait_ready(startup_timeout_s)
    return server


# --- stopping launched servers at exit and on SIGTERM ------------------------------

_LIVE: dict[int, Server] = {}


def stop_all() -> bool:
    """Stop every server this process launched and has not stopped; whether there was any (run at exit
    and on SIGTERM through pathgen.store.shutdown, with the item caches' flush)."""
    mine = [server for server in list(_LIVE.values()) if server.owner_pid == os.getpid()]
    for server in mine:
        try:
            server.stop(grace_s=2.0)
        except Exception as exc:  # at exit or in a signal handler: report, never mask the exit
            print(f"pathgen.models.server: could not stop {server.argv[0]} (pid {server.pid}): {exc}",
                  file=sys.stderr)
    return bool(mine)
