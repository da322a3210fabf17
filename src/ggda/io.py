"""Every file ggda writes goes through here: atomic writes and checksums.

A file is written to a hidden temporary file in its own directory, flushed, ``fsync``-ed and
renamed over its final name, so a reader (or a resumed run) sees either the old file or the
complete new one, never a truncated one. When the write fails (disk full, file-size limit,
permissions) the temporary file is removed and the error is one :class:`GGDAError` line naming
the file; nothing is left behind.

Checksums (SHA-256) let readers tell a complete, untouched file from a truncated or overwritten
one: :func:`file_digest` and :func:`verify_digest`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from ggda.errors import GGDAError

__all__ = [
    "CorruptFile",
    "atomic_open",
    "atomic_write",
    "file_digest",
    "read_json",
    "save_csv",
    "save_json",
    "save_npy",
    "save_npz",
    "save_torch",
    "verify_digest",
    "write_text",
]

_CHUNK = 1 << 22  # 4 MiB reads when hashing


class CorruptFile(GGDAError):
    """A stored file that is truncated, overwritten or fails its checksum."""


def _write_error(path: Path, exc: OSError) -> GGDAError:
    reason = exc.strerror or " ".join(str(exc).split())[:120] or type(exc).__name__
    return GGDAError(
        f"Could not write {path} ({reason}); free disk space or choose another output directory, then "
        "rerun the same command."
    )


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it is flushed, fsync-ed and renamed
    to ``path``; on any error it is removed (and an ``OSError`` becomes one GGDAError line)."""
    path = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode {mode!r} has no 'w'.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        try:
            fh = open(tmp, mode, **kwargs)  # noqa: SIM115  (closed below, before the rename)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a ``writer(fh)`` callable) to ``path`` atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        if isinstance(data, str):
            fh.write(data.encode("utf-8"))
        elif isinstance(data, bytes | bytearray | memoryview):
            fh.write(data)
        else:
            data(fh)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, text)


def save_json(path: str | Path, obj: Any, **kwargs) -> Path:
    """``json.dumps(obj, **kwargs)`` written atomically (``indent=2`` unless given)."""
    kwargs.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **kwargs))


class _Stream:
    """A file seen only through ``write``: NumPy then writes in chunks through Python (whose
    ``OSError`` keeps its errno, e.g. "No space left on device") instead of ``ndarray.tofile``."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def write(self, data) -> int:
        return self._fh.write(data)


def save_npy(path: str | Path, array: Any) -> Path:
    """``np.save``, atomically (no pickled objects)."""
    arr = np.asarray(array)
    return atomic_write(path, lambda fh: np.save(_Stream(fh), arr, allow_pickle=False))


def save_npz(path: str | Path, **arrays: Any) -> Path:
    """``np.savez``, atomically."""
    return atomic_write(path, lambda fh: np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_csv(path: str | Path, frame, **kwargs) -> Path:
    """``DataFrame.to_csv(path, index=False)``, atomically."""
    kwargs.setdefault("index", False)
    buf = io.StringIO()
    frame.to_csv(buf, **kwargs)
    return atomic_write(path, buf.getvalue())


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save``, atomically."""
    import torch

    def write(fh: IO[bytes]) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:  # torch wraps the disk's OSError (EFBIG, ENOSPC) in its own error
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise

    return atomic_write(path, write)


# -- checksums --------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_digest(path: str | Path, expected: str | None, fix: str) -> None:
    """Raise :class:`CorruptFile` naming ``path`` when its SHA-256 is not ``expected``."""
    path = Path(path)
    if expected is None:
        return
    try:
        actual = file_digest(path)
    except FileNotFoundError as exc:
        raise CorruptFile(f"{path} is missing; {fix}") from exc
    if actual != expected:
        raise CorruptFile(f"{path} is corrupt (its checksum does not match what was written); {fix}")


def read_json(path: str | Path, fix: str) -> Any:
    """``json.loads`` of a file; unreadable or invalid JSON is a :class:`CorruptFile` naming it."""
    path = Path(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{path} is not valid JSON (truncated or overwritten?); {fix}") from exc
