"""Work a process must finish when it ends or is sent SIGTERM (a cancelled or preempted SLURM job):
flushing item caches (pathgen.store.cache), stopping launched servers (pathgen.models.server).

One SIGTERM handler runs every registered cleanup, then hands over to the handler that was there
before it, or dies by the signal so the scheduler sees a SIGTERM death. The same cleanups run at
interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

# Each cleanup returns whether it had live work in this process (an open cache, a running server):
# then the job cannot go on after a previous handler that returns, and exits.
_CLEANUPS: list[Callable[[], bool]] = []
_ATEXIT_REGISTERED = False
_SIGTERM_INSTALLED = False
_PREVIOUS_SIGTERM: Any = None


def on_shutdown(cleanup: Callable[[], bool]) -> None:
    """Run `cleanup` at exit and on SIGTERM (registering the same function twice runs it once).

    The handler can only be set from the main thread: a later call from there installs it."""
    global _ATEXIT_REGISTERED, _SIGTERM_INSTALLED, _PREVIOUS_SIGTERM
    if cleanup not in _CLEANUPS:
        _CLEANUPS.append(cleanup)
    if not _ATEXIT_REGISTERED:
        atexit.register(run_cleanups)
        _ATEXIT_REGISTERED = True
    if not _SIGTERM_INSTALLED and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        _SIGTERM_INSTALLED = True
        if previous is signal.SIG_IGN:
            return  # the process chose to ignore SIGTERM: leave it so (exit still runs the cleanups)
        _PREVIOUS_SIGTERM = previous
        signal.signal(signal.SIGTERM, _on_sigterm)


def run_cleanups() -> bool:
    """Run every cleanup, last registered first; whether any had live work. A failing cleanup is
    reported and the others still run (at exit or in a signal handler, never mask the exit)."""
    active = False
    for cleanup in reversed(_CLEANUPS):
        try:
            active = bool(cleanup()) or active
        except Exception as exc:
            print(f"pathgen: cleanup {cleanup.__qualname__} failed: {exc}", file=sys.stderr)
    return active


def _on_sigterm(signum: int, frame: Any) -> None:
    active = run_cleanups()
    previous = _PREVIOUS_SIGTERM
    if callable(previous):
        previous(signum, frame)
        if active:
            raise SystemExit(128 + signum)
        return  # nothing of ours was in use: the previous handler alone decides
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
