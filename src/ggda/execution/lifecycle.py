"""Process lifecycle: clean ends on SIGINT/SIGTERM, and workers that never outlive their parent.

**Signals.** :func:`exit_on_signals` (used by the ``ggda`` entry point) turns SIGINT, SIGTERM and
SIGHUP into an :class:`Interrupted` exception in the main thread. It is a ``BaseException`` (not
a ``KeyboardInterrupt``, which the CLI framework would turn into a bare exit status), so it
unwinds every ``finally`` and ``with`` block: executors store the results that have already
finished, stop their workers (:func:`stop_pool`) and release their directory locks; the entry
point then prints one line, :data:`INTERRUPTED_MESSAGE`, and exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). Everything stored survives, so rerunning the same command
resumes. A second signal while that cleanup runs ends the process at once (the workers still
die, see below).

**Workers die with their parent.** Every local-pool worker runs :func:`worker_init` first: it
ignores SIGINT (a Ctrl-C reaches the whole process group; the parent alone decides what to stop,
so workers print no tracebacks), and :func:`die_with_parent` arranges that the worker is killed
when the process that started it dies, however it dies (SIGKILL included): on Linux with
``prctl(PR_SET_PDEATHSIG, SIGKILL)``, elsewhere with a thread polling the parent pid. Without
workers holding it open, multiprocessing's resource tracker sees end-of-file and exits too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"
_PR_SET_PDEATHSIG = 1
_HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """A signal asked this process to stop; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"{signal.Signals(self.signum).name}: {INTERRUPTED_MESSAGE}")


def _default_disposition(signum: int) -> bool:
    """Whether ``signum`` still has its default handler (an ignored signal stays ignored:
    ``nohup`` and background jobs of non-interactive shells rely on that)."""
    current = signal.getsignal(signum)
    if signum == signal.SIGINT:
        return current is signal.default_int_handler
    return current == signal.SIG_DFL


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread.

    A second signal during the cleanup that follows exits immediately with the same status.
    Outside the main thread (where handlers cannot be installed) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:  # already unwinding: a second Ctrl-C means "now"
            os.write(2, f"{INTERRUPTED_MESSAGE}\n".encode())
            os._exit(128 + fired[0])
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for signum in _HANDLED:
        if _default_disposition(signum):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# -- workers ------------------------------------------------------------------------------------
def _prctl_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return False


def _watch_parent(parent: int, every: float) -> None:
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int, poll: float = 1.0) -> None:
    """End this process when ``parent`` (the pid that started it) dies, however it dies."""
    armed = _prctl_pdeathsig()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent, poll), daemon=True).start()


def worker_init(threads: int, parent: int) -> None:
    """Initializer of every local-pool worker: die with the parent, leave SIGINT to it, cap threads."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ggda.execution.jobs import limit_threads

    limit_threads(threads)


def stop_pool(pool: object, timeout: float = 5.0) -> None:
    """Stop a ``ProcessPoolExecutor`` now: cancel queued jobs, terminate (then kill) its workers."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
