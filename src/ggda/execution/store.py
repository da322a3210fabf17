"""A directory of keyed results, written atomically: the unit of resumability.

Each result is ``KEY.npz`` (arrays) plus ``KEY.json`` (metadata). A result exists only once both
files are complete (written to ``.part`` files, then renamed), so a crash mid-write never leaves
a half result that a resumed run would trust.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError

_KEY = re.compile(r"^[A-Za-z0-9_.=+-]+$")


class ResultStore:
    """Keyed results under ``root``; safe to share between processes (one writer per key)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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

    def has(self, key: str) -> bool:
        arrays, meta = self._paths(key)
        return arrays.exists() and meta.exists()

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        apath, mpath = self._paths(key)
        tmp = apath.with_name(f".{key}.{os.getpid()}.npz.part")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
        tmp.replace(apath)
        mtmp = mpath.with_name(f".{key}.{os.getpid()}.json.part")
        mtmp.write_text(json.dumps(meta or {}, default=float))
        mtmp.replace(mpath)  # the .json appearing last marks the result complete

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict]:
        apath, mpath = self._paths(key)
        if not self.has(key):
            raise GGDAError(f"No result '{key}' in {self.root}; run the job first.")
        with np.load(apath) as data:
            arrays = {k: data[k] for k in data.files}
        return arrays, json.loads(mpath.read_text())

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if (self.root / f"{p.stem}.npz").exists())

    def __len__(self) -> int:
        return len(self.keys())
