"""One command per output directory: a lock file naming its holder, refused while the holder lives.

Two commands writing the same output directory (a gold ``OUT``, an evaluation store, a feature
store) would both redo every job and race on shared files. So a command *claims* the directory
first: :class:`DirectoryLock` creates ``DIR/.ggda.lock`` and holds an exclusive ``flock`` on it
for as long as it works there, with its pid, host, start time and command line written inside.

**Behaviour: a second command refuses, it does not wait.** It fails at once with one error line
naming the holder (pid, host, since when, which command) and the fix: wait for that command to
finish (or stop it) and rerun — the first command's stored results are then reused — or choose
another output directory. Waiting silently behind a long evaluation looked like a hang; library
callers who prefer to wait pass ``wait=SECONDS``.

**Stale locks are taken over.** The kernel drops an ``flock`` when its holder dies, however it
dies (SIGKILL, out-of-memory kill, power loss of a client on a shared filesystem that supports
locks), so the lock file of a dead command is simply claimed by the next one. On filesystems
without ``flock`` the file's contents decide: a holder on this host whose pid is gone (or now
belongs to another process) is stale and taken over; a live one, or one on another host that
cannot be checked, is refused and the message says which file to delete if it is known dead.

Locks are re-entrant within a process (a gold computation claims ``OUT``, its executor then
claims ``OUT/store``, and a retrainer claims its store while each of its runs claims it again),
and the file is removed when the last claim is released, so a finished command leaves nothing
behind. Every executor claims its result store for the length of :meth:`Executor.run`, so every
command that runs jobs inherits the lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ggda.errors import GGDAError

LOCK_NAME = ".ggda.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock file's contents alone decide
    fcntl = None

_held: dict[str, list] = {}  # resolved directory -> [fd or None, claims]
_guard = threading.Lock()


def _forget_in_child() -> None:
    _held.clear()  # a forked child holds none of its parent's claims


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OSError:  # pragma: no cover
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    cmd = info.get("command") or "?"
    cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}: {cmd}"


class DirectoryLock:
    """Claim ``directory`` for this process (see the module docstring).

    Args:
        directory: the output directory (created if missing).
        wait: seconds to wait for a live holder before refusing (default 0: refuse at once).

    Use as a context manager, or :meth:`acquire` / :meth:`release` (idempotent).
    """

    def __init__(self, directory: str | Path, wait: float = 0.0) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.wait = float(wait)
        self._key: str | None = None

    # -- public -----------------------------------------------------------------------------------
    def acquire(self) -> DirectoryLock:
        if self._key is not None:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GGDAError(
                f"Cannot create the output directory {self.directory} ({exc.strerror or exc}); choose "
                "another output path."
            ) from exc
        key = os.path.realpath(self.directory)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
        fd = self._claim()
        with _guard:
            _held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        fd = entry[0]
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()  # still ours: remove it while holding it
        with contextlib.suppress(OSError):
            os.close(fd)  # drops the flock

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder(self) -> dict:
        """What the lock file says about its holder ({} if none or unreadable)."""
        try:
            return self._parse(self.path.read_bytes())
        except OSError:
            return {}

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return DirectoryLock._parse(os.pread(fd, 1 << 16, 0))
        except OSError:
            return {}

    @staticmethod
    def _stale(info: dict) -> bool | None:
        """True: the holder is dead; False: alive; None: cannot tell (another host)."""
        if not info:
            return True
        if info.get("host") != socket.gethostname():
            return None
        try:
            pid = int(info["pid"])
        except (KeyError, TypeError, ValueError):
            return True
        if pid == os.getpid():
            return True  # our own leftover (a claim this process forgot, e.g. after fork)
        return not _pid_alive(pid, info.get("pid_start"))

    def _busy(self, info: dict, checkable: bool = True) -> GGDAError:
        msg = (
            f"{self.directory} is in use by another ggda command ({_holder_text(info)}); wait for it to "
            "finish (or stop it) and rerun the same command to reuse its stored results, or choose "
            "another output directory."
        )
        if not checkable:
            msg = msg[:-1] + f"; if that command is no longer running, delete {self.path}."
        return GGDAError(msg)

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno in _NO_WRITE:
                return None  # a read-only directory: nothing can be written there, nothing to guard
            if exc.errno == errno.ENAMETOOLONG or exc.errno == errno.ENOTDIR:
                raise GGDAError(
                    f"Cannot use {self.directory} as an output directory ({exc.strerror}); choose another "
                    "output path."
                ) from exc
            raise

    def _claim(self) -> int | None:
        deadline = time.monotonic() + self.wait
        while True:
            fd = self._open()
            if fd is None:
                return None
            locked = self._flock(fd)
            if locked is True:
                if not self._same_file(fd):
                    os.close(fd)  # the holder removed the file as we opened it: start again
                    continue
                self._write(fd)
                return fd
            info = self._read(fd)
            checkable = True
            if locked is None:  # no flock on this filesystem: the file's contents decide
                stale = self._stale(info)
                if stale:
                    self._write(fd)
                    return fd
                checkable = stale is False
            os.close(fd)
            if time.monotonic() >= deadline:
                raise self._busy(info, checkable)
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: someone else holds it; None: this filesystem has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return None
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _write(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]),
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)


def claim_directory(directory: str | Path, wait: float = 0.0) -> DirectoryLock:
    """Claim ``directory`` (a :class:`DirectoryLock`, acquired); use it as a context manager."""
    return DirectoryLock(directory, wait=wait).acquire()
