"""Reading stored NumPy files (``.npy``/``.npz``) that ggda wrote or a user passed.

A missing, empty, truncated or overwritten file, or one holding pickled Python objects (which are
never loaded: unpickling runs code), is one :class:`~ggda.errors.GGDAError` line naming the file
and the fix — never NumPy's ``EOFError`` (which the command-line framework would take for Ctrl-D)
or a ``BadZipFile`` that names no file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError

__all__ = ["read_npy", "read_npz"]

_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError, RuntimeError)


def _exists(path: Path, fix: str) -> None:
    if not path.exists():
        raise GGDAError(f"{path} does not exist; {fix}")
    if path.is_dir():
        raise GGDAError(f"{path} is a directory, not a .{path.suffix.lstrip('.') or 'npy'} file; {fix}")
    if path.stat().st_size == 0:
        raise GGDAError(f"{path} is empty (0 bytes); {fix}")


def read_npy(path: str | Path, fix: str) -> np.ndarray:
    """The array in ``path``; anything unreadable is one error line naming it (``fix`` says what to do)."""
    path = Path(path)
    _exists(path, fix)
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise GGDAError(
            f"{path} is not a readable .npy array (truncated, overwritten or pickled); {fix}"
        ) from exc


def read_npz(path: str | Path, fix: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array in ``path`` (loaded now, the file closed); the ``required`` names must be there."""
    path = Path(path)
    _exists(path, fix)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _UNREADABLE as exc:
        raise GGDAError(f"{path} is not a readable .npz archive (truncated or overwritten); {fix}") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise GGDAError(f"{path} lacks {', '.join(missing)}; {fix}")
    return arrays
