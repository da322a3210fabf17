"""On-disk, chunked feature/gradient matrices: the store that lets n = 10⁶ never be an n × p array.

Why: the training side of gradient attribution is one row per group (a group gradient, or its
random projection). For large n that matrix does not fit in memory (TRAK's users hit 200 GB at
1M × 50K), so it is written **chunk by chunk as it is produced** and read back **chunk by chunk**
(memory-mapped) when scoring.

Layout (format ``ggda-feature-store``, version 2)::

    STORE/manifest.json        what the rows are and how they were made (see below)
    STORE/chunks/c000000.npy   rows [0, R)           (R = chunk_rows), dtype float32/float16/float64
    STORE/chunks/c000001.npy   rows [R, 2R)
    ...                        the last chunk may be shorter

``manifest.json`` holds ``format``, ``version``, ``n_rows`` (K groups), ``dim`` (d), ``dtype``,
``chunk_rows``, ``n_chunks``, ``n_points`` (training points behind the rows; = K for singletons),
``fingerprint`` (hash of ``config``), ``config`` (model/data/grouping/projection description that
defines the rows), ``meta`` (free-form), ``checksums`` (SHA-256 per chunk, once complete) and
``complete`` (all chunks present and checked).
Row i is group i (group-id order). Every chunk is a plain ``.npy`` file, so any NumPy user can
``np.load(path, mmap_mode="r")`` it without ggda.

Crash safety and resuming: a chunk is written to a ``.part`` file, flushed to disk and renamed;
a chunk file with its final name is therefore complete, and a crash mid-write leaves only a
``.part`` that is ignored and later overwritten. Every chunk's SHA-256 is written beside it
(``chunks/c000000.npy.sha256``, before the chunk itself) and collected into the manifest
(``checksums``) when the store is finalised; chunks are verified when read, so a chunk truncated or
overwritten after it was written is never used: a build treats it as missing and recomputes it,
a reader refuses it with an error naming the file. (Version-1 stores have no checksums and are
read as before.) Re-opening a store with the same ``config``
resumes at the missing chunks; a different ``config`` is refused, so rows of two different models
are never mixed. Chunks are independent, so several processes (e.g. Ray tasks on a shared
filesystem) may write different chunks of one store at the same time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError
from ggda.io import CorruptFile, atomic_write, bytes_digest, file_digest, read_json, save_json, save_npy

FORMAT = "ggda-feature-store"
VERSION = 2  # 2: per-chunk SHA-256 checksums
DTYPES = ("float16", "float32", "float64")


def fingerprint(config: dict) -> str:
    """Stable hash of a configuration (what defines the rows)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class FeatureStore:
    """A (n_rows × dim) matrix on disk in row chunks; see the module docstring for the layout."""

    def __init__(self, path: str | Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._verified: dict[int, tuple] = {}  # chunk -> file stamp when its checksum matched

    # -- creation / opening ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        n_rows: int,
        dim: int,
        chunk_rows: int,
        dtype: str = "float32",
        config: dict | None = None,
        n_points: int | None = None,
        meta: dict | None = None,
        overwrite: bool = False,
    ) -> FeatureStore:
        """New store, or the existing one at ``path`` if it was made with the same configuration.

        An existing store with another configuration (or other shape) is an error unless
        ``overwrite``, which deletes its manifest and chunks (and nothing else).
        """
        if dtype not in DTYPES:
            raise GGDAError(f"Unknown store dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
        if n_rows < 1 or dim < 1 or chunk_rows < 1:
            raise GGDAError(
                f"A store needs n_rows, dim, chunk_rows >= 1 (got {n_rows}, {dim}, {chunk_rows})."
            )
        path = Path(path)
        old = None
        config = dict(config or {})
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "n_rows": int(n_rows),
            "dim": int(dim),
            "dtype": dtype,
            "chunk_rows": int(chunk_rows),
            "n_chunks": math.ceil(n_rows / chunk_rows),
            "n_points": int(n_points if n_points is not None else n_rows),
            "fingerprint": fingerprint(config),
            "config": config,
            "meta": dict(meta or {}),
            "complete": False,
        }
        if (path / "manifest.json").exists():
            try:
                old = cls.open(path)
            except GGDAError:
                if not overwrite:
                    raise
                cls(path, {}).delete()  # a damaged store, replaced as asked
                old = None
        if old is not None:
            same = all(
                old.manifest[k] == manifest[k]
                for k in ("fingerprint", "n_rows", "dim", "dtype", "chunk_rows")
            )
            if same:
                return old  # resume
            if not overwrite:
                raise GGDAError(
                    f"{path} holds a feature store built with another configuration; choose a new path or "
                    "pass overwrite (--overwrite) to replace it."
                )
            old.delete()
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        store = cls(path, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        mfile = path / "manifest.json"
        if not mfile.exists():
            raise GGDAError(
                f"{path} is not a feature store (no manifest.json); build one with `ggda features build`."
            )
        manifest = read_json(mfile, "rebuild the store with `ggda features build --overwrite`.")
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("version"), int)
            or manifest["version"] > VERSION
        ):
            raise GGDAError(f"{path} is not a version-{VERSION} {FORMAT}; rebuild it with this ggda.")
        required = ("n_rows", "dim", "dtype", "chunk_rows", "n_chunks", "fingerprint", "config")
        missing = [k for k in required if k not in manifest]
        if missing or manifest["dtype"] not in DTYPES:
            raise CorruptFile(
                f"{mfile} is damaged (missing {missing or 'a valid dtype'}); rebuild the store with "
                "`ggda features build --overwrite`."
            )
        return cls(path, manifest)

    def delete(self) -> None:
        """Remove this store's manifest and chunk files (only those)."""
        shutil.rmtree(self.path / "chunks", ignore_errors=True)
        (self.path / "manifest.json").unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        save_json(self.path / "manifest.json", self.manifest, default=str)

    # -- shape ----------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    @property
    def n_points(self) -> int:
        return int(self.manifest["n_points"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.dtype.itemsize

    def rows(self, chunk: int) -> slice:
        """The rows (group ids) chunk ``chunk`` holds."""
        if not 0 <= chunk < self.n_chunks:
            raise GGDAError(f"Chunk {chunk} is out of range 0..{self.n_chunks - 1}.")
        start = chunk * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    def chunk_path(self, chunk: int) -> Path:
        return self.path / "chunks" / f"c{chunk:06d}.npy"

    # -- writing --------------------------------------------------------------------------------
    def digest_path(self, chunk: int) -> Path:
        """The chunk's SHA-256 sidecar (written before the chunk, so a chunk file never lacks it)."""
        return self.chunk_path(chunk).with_name(self.chunk_path(chunk).name + ".sha256")

    @property
    def checksummed(self) -> bool:
        return int(self.manifest.get("version", 1)) >= 2

    def expected_digest(self, chunk: int) -> str | None:
        """The SHA-256 a chunk must have: from the manifest once complete, else its sidecar
        (``None`` for version-1 stores, which have no checksums)."""
        if not self.checksummed:
            return None
        sums = self.manifest.get("checksums")
        if isinstance(sums, list) and len(sums) == self.n_chunks and sums[chunk]:
            return str(sums[chunk])
        try:
            return self.digest_path(chunk).read_text().strip() or "missing"
        except (OSError, UnicodeDecodeError):
            return "missing"

    def verify_chunk(self, chunk: int) -> None:
        """Raise :class:`CorruptFile` naming the chunk file when it does not match its checksum."""
        path = self.chunk_path(chunk)
        expected = self.expected_digest(chunk)
        if expected is None:
            return
        stamp = _stamp(path)
        if self._verified.get(chunk) == stamp:
            return
        if file_digest(path) != expected:
            raise CorruptFile(
                f"Chunk file {path} is corrupt (truncated or overwritten: its checksum does not match); rerun "
                "`ggda features build` with the same options to recompute it."
            )
        self._verified[chunk] = stamp

    def has_chunk(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is written and intact; a damaged chunk is removed (with a
        warning) and reported missing, so a resumed build recomputes it."""
        path = self.chunk_path(chunk)
        if not path.exists():
            return False
        try:
            self.verify_chunk(chunk)
        except CorruptFile as exc:
            warnings.warn(f"{exc} Recomputing it.", RuntimeWarning, stacklevel=2)
            self.discard_chunk(chunk)
            return False
        return True

    def discard_chunk(self, chunk: int) -> None:
        """Remove a chunk (and its checksum); the store is no longer complete."""
        self.chunk_path(chunk).unlink(missing_ok=True)
        self.digest_path(chunk).unlink(missing_ok=True)
        self._verified.pop(chunk, None)
        if self.manifest.get("complete") or self.manifest.get("checksums"):
            self.manifest["complete"] = False
            self.manifest.pop("checksums", None)
            self._write_manifest()

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self.has_chunk(c)]

    def write_chunk(self, chunk: int, block: np.ndarray) -> None:
        """Write one chunk atomically (``.part`` → fsync → rename), its checksum first."""
        rows = self.rows(chunk)
        block = np.ascontiguousarray(np.asarray(block), dtype=self.dtype)
        if block.shape != (rows.stop - rows.start, self.dim):
            raise GGDAError(
                f"Chunk {chunk} must have shape {(rows.stop - rows.start, self.dim)}, got {block.shape}."
            )
        buf = io.BytesIO()
        np.save(buf, block, allow_pickle=False)
        data = buf.getbuffer()
        if self.checksummed:
            atomic_write(self.digest_path(chunk), bytes_digest(data) + "\n")
        atomic_write(self.chunk_path(chunk), data)
        self._verified.pop(chunk, None)

    def write_sizes(self, sizes: np.ndarray) -> None:
        """Group sizes (``sizes.npy``), with their checksum in the manifest."""
        path = self.path / "sizes.npy"
        save_npy(path, np.asarray(sizes, dtype=np.int64))
        self.manifest.setdefault("files", {})["sizes.npy"] = file_digest(path)
        self._write_manifest()

    def sizes(self) -> np.ndarray | None:
        """Group sizes, verified against the manifest (``None`` when the store has none)."""
        path = self.path / "sizes.npy"
        if not path.exists():
            return None
        fix = "rerun `ggda features build` with the same options to rewrite it."
        expected = self.manifest.get("files", {}).get("sizes.npy")
        if expected is not None and file_digest(path) != expected:
            raise CorruptFile(f"{path} is corrupt (its checksum does not match); {fix}")
        try:
            sizes = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CorruptFile(f"{path} cannot be read (truncated or overwritten); {fix}") from exc
        if sizes.shape != (self.n_rows,):
            raise CorruptFile(f"{path} holds {sizes.shape} sizes for {self.n_rows} groups; {fix}")
        return sizes

    def finalize(self) -> FeatureStore:
        """Check every chunk (header and checksum) and mark the store complete."""
        missing = self.missing_chunks()
        if missing:
            raise GGDAError(
                f"The store at {self.path} misses {len(missing)} chunk(s) (first: {missing[0]}); re-run the "
                "build to resume it."
            )
        for c in range(self.n_chunks):
            arr = self.read_chunk(c)
            rows = self.rows(c)
            if arr.shape != (rows.stop - rows.start, self.dim) or arr.dtype != self.dtype:
                raise GGDAError(f"Chunk {c} of {self.path} has shape {arr.shape} {arr.dtype}; rebuild it.")
        if self.checksummed:
            self.manifest["checksums"] = [self.expected_digest(c) for c in range(self.n_chunks)]
        self.manifest["complete"] = True
        self._write_manifest()
        return self

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # -- reading --------------------------------------------------------------------------------
    def read_chunk(self, chunk: int, mmap: bool = True) -> np.ndarray:
        """One chunk, memory-mapped read-only by default (no copy until used)."""
        path = self.chunk_path(chunk)
        if not path.exists():
            raise GGDAError(f"Chunk {chunk} of {self.path} has not been written; resume the build first.")
        self.verify_chunk(chunk)
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CorruptFile(
                f"Chunk file {path} cannot be read (truncated or overwritten); rerun `ggda features build` "
                "with the same options to recompute it."
            ) from exc
        rows = self.rows(chunk)
        if arr.shape != (rows.stop - rows.start, self.dim) or arr.dtype != self.dtype:
            raise CorruptFile(
                f"Chunk file {path} holds {arr.shape} {arr.dtype}, not {(rows.stop - rows.start, self.dim)} "
                f"{self.dtype}; rerun `ggda features build` with the same options to recompute it."
            )
        return arr

    def iter_chunks(self, mmap: bool = True) -> Iterator[tuple[slice, np.ndarray]]:
        """``(rows, block)`` for every chunk in row order."""
        for c in range(self.n_chunks):
            yield self.rows(c), self.read_chunk(c, mmap)

    def to_array(self) -> np.ndarray:
        """The whole (n_rows × dim) matrix in memory — only when asked for."""
        out = np.empty((self.n_rows, self.dim), dtype=self.dtype)
        for rows, block in self.iter_chunks():
            out[rows] = block
        return out

    def __repr__(self) -> str:
        state = (
            "complete"
            if self.complete
            else f"{self.n_chunks - len(self.missing_chunks())}/{self.n_chunks} chunks"
        )
        return f"FeatureStore({self.path}, {self.n_rows}×{self.dim} {self.dtype}, {state})"


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)
