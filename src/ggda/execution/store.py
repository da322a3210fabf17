"""A directory of keyed results, written atomically and checksummed: the unit of resumability.

Each result is ``KEY.npz`` (arrays) plus ``KEY.json`` (metadata and the SHA-256 of both). A result
exists only once both files are complete (each written to a temporary file, fsync-ed and renamed;
the ``.json`` last), so a crash mid-write never leaves a half result that a resumed run would
trust. A result whose files no longer match their checksums (truncated, overwritten) counts as
missing: :meth:`ResultStore.has` removes it, with a warning, so an executor recomputes it, and
:meth:`ResultStore.get` refuses it with an error naming the file.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError
from ggda.io import CorruptFile, atomic_write, bytes_digest, file_digest, save_npz

_KEY = re.compile(r"^[A-Za-z0-9_.=+-]+$")
FORMAT = "ggda-result"
VERSION = 2  # 2: checksums in KEY.json (1: KEY.json held the metadata alone)


def _meta_digest(meta: dict) -> str:
    return bytes_digest(json.dumps(meta, sort_keys=True).encode())


class ResultStore:
    """Keyed results under ``root``; safe to share between processes (one writer per key)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise GGDAError(f"{self.root} is a file, not a result directory; choose another output path.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GGDAError(
                f"Cannot create the result directory {self.root} ({exc.strerror}); choose another output path."
            ) from exc
        self._verified: dict[str, tuple] = {}

    @staticmethod
    def check_key(key: str) -> str:
        if not _KEY.match(key):
            raise GGDAError(
                f"Result key '{key}' has characters other than letters, digits and _.=+-; use job_key()."
            )
        return key

    def _paths(self, key: str) -> tuple[Path, Path]:
        self.check_key(key)
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    # -- writing --------------------------------------------------------------------------------
    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        apath, mpath = self._paths(key)
        save_npz(apath, **arrays)
        meta = json.loads(json.dumps(meta or {}, default=float))  # what a reader will see
        record = {
            "format": FORMAT,
            "version": VERSION,
            "npz_sha256": file_digest(apath),
            "meta_sha256": _meta_digest(meta),
            "meta": meta,
        }
        atomic_write(mpath, json.dumps(record, default=float))  # appearing last marks it complete
        self._verified.pop(key, None)

    def delete(self, key: str) -> None:
        """Remove a result (its ``.json`` first, so a half-deleted result is never complete)."""
        apath, mpath = self._paths(key)
        mpath.unlink(missing_ok=True)
        apath.unlink(missing_ok=True)
        self._verified.pop(key, None)

    # -- reading --------------------------------------------------------------------------------
    def _fix(self, key: str) -> str:
        return (
            f"delete {self.root / key}.npz and .json and rerun the same command to recompute it "
            "(or rerun it directly: a resumable command recomputes corrupt results)."
        )

    def _read(self, key: str, load: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        """Verify (and with ``load``, load) one result; a damaged one is a :class:`CorruptFile`
        naming its file. Results with checksums are hashed once per process until rewritten."""
        apath, mpath = self._paths(key)
        fix = self._fix(key)
        try:
            record = json.loads(mpath.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFile(
                f"Stored result {mpath} is not valid JSON (truncated or overwritten); {fix}"
            ) from exc
        if isinstance(record, dict) and record.get("format") == FORMAT:
            meta = record.get("meta")
            if not isinstance(meta, dict) or record.get("meta_sha256") != _meta_digest(meta):
                raise CorruptFile(f"Stored result {mpath} fails its checksum (edited or overwritten); {fix}")
            stamp = _stamp(apath)
            if self._verified.get(key) != stamp:
                if file_digest(apath) != record.get("npz_sha256"):
                    raise CorruptFile(
                        f"Stored result {apath} fails its checksum (truncated or overwritten); {fix}"
                    )
                self._verified[key] = stamp
            if not load:
                return {}, meta
        elif isinstance(record, dict):
            meta = record  # version 1: no checksums; loading checks the zip's own CRCs
        else:
            raise CorruptFile(f"Stored result {mpath} does not hold a JSON object; {fix}")
        try:
            with np.load(apath, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise CorruptFile(
                f"Stored result {apath} cannot be read (truncated or overwritten); {fix}"
            ) from exc
        return arrays, meta

    def has(self, key: str) -> bool:
        """Whether a complete, intact result is stored under ``key``.

        A damaged result (checksum mismatch, truncated) is removed with a warning and reported
        missing, so an executor recomputes it.
        """
        apath, mpath = self._paths(key)
        if not (apath.exists() and mpath.exists()):
            return False
        try:
            self._read(key, load=False)
        except CorruptFile as exc:
            warnings.warn(f"{exc} Recomputing it.", RuntimeWarning, stacklevel=2)
            self.delete(key)
            return False
        return True

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict]:
        """``(arrays, meta)`` of a stored result, verified against its checksums."""
        apath, mpath = self._paths(key)
        if not (apath.exists() and mpath.exists()):
            raise GGDAError(f"No result '{key}' in {self.root}; run the job first.")
        return self._read(key)

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if (self.root / f"{p.stem}.npz").exists())

    def __len__(self) -> int:
        return len(self.keys())


def _stamp(path: Path) -> tuple:
    """What changes when a file is rewritten (a verified file is not re-hashed until then)."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)
