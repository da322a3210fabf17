"""Output paths checked before any work starts.

A command that would train for an hour and then fail to write its result because ``--out`` is a
file, lies under a file, is too long for the filesystem or sits on a read-only one is refused at
once, with one :class:`GGDAError` line naming the path and the fix. Nothing is created by the
check: the directory itself is made when the command writes (a probe directory is made and
removed in the nearest existing ancestor to learn whether it is writable, which ``os.access``
cannot tell for root or for read-only mounts).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ggda.errors import GGDAError

__all__ = ["check_output_dir", "check_output_file", "new_output_dir"]

_NAME_MAX = 255
_PATH_MAX = 4096


def _limits(anchor: Path) -> tuple[int, int]:
    try:
        return os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        return _NAME_MAX, _PATH_MAX


def _nearest_existing(path: Path) -> Path:
    p = path
    while True:
        try:
            os.lstat(p)
            return p
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            pass
        if p.parent == p:
            return p
        p = p.parent


def _check_length(path: Path, flag: str, what: str) -> None:
    text = os.fspath(path.absolute())
    name_max, path_max = _limits(Path(text).anchor or Path("/"))
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in Path(text).parts), default=0)
    if longest > name_max or len(text.encode("utf-8", "surrogateescape")) >= path_max:
        raise GGDAError(
            f"{flag} {path} is too long for the filesystem (a name is at most {name_max} bytes, a path "
            f"{path_max}); choose a shorter {what}."
        )


def _check_writable(path: Path, flag: str, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        raise GGDAError(
            f"{flag} {path} lies under {ancestor}, which is a file, not a directory; choose another {what}."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".ggda-write-check-", dir=ancestor)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise GGDAError(
                f"{flag} {path} cannot be written: {ancestor} is read-only; choose a writable {what}."
            ) from exc
        raise GGDAError(
            f"{flag} {path} cannot be written in {ancestor} ({exc.strerror}); choose a writable {what}."
        ) from exc
    os.rmdir(probe)


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be created or written, before any work."""
    path = Path(path)
    _check_length(path, flag, "directory")
    if path.exists() and not path.is_dir():
        raise GGDAError(f"{flag} {path} is a file, not a directory; remove it or choose another directory.")
    _check_writable(path, flag, "directory")
    return path


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output file that cannot be written (a directory there, under a file, too long,
    read-only), before any work."""
    path = Path(path)
    _check_length(path, flag, "file")
    if path.is_dir():
        raise GGDAError(f"{flag} {path} is a directory; pass a file path.")
    _check_writable(path.parent, flag, "file")
    return path


@contextmanager
def new_output_dir(path: str | Path) -> Iterator[Path]:
    """Create output directory ``path`` for a command that is not resumable; when the command
    fails inside the block, remove what this created (only directories that did not exist
    before, with their contents), so a failure leaves nothing behind."""
    path = Path(path)
    created = None
    p = path
    while not p.exists() and p.parent != p:
        created, p = p, p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
