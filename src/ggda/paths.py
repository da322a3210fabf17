"""Names that become paths: sanitised and confined to their directory.

Method, grouping, property and kernel names come from the user (``--grouping
given:values=../../x``); wherever one becomes part of a file or directory name it goes through
:func:`safe_name` (one path component, no separators, no leading dot, bounded length) and the
result through :func:`confined_path`, which refuses anything that would resolve outside its root
(symbolic links included).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ggda.errors import GGDAError

__all__ = ["MAX_NAME", "confined_path", "safe_name"]

MAX_NAME = 100  # characters; well under every filesystem's 255-byte component limit
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def safe_name(name: object) -> str:
    """``name`` as one harmless path component.

    Runs of characters other than letters, digits and ``._=+,-`` (separators ``/`` and ``\\``,
    spaces, ``:``, control characters, non-ASCII) become ``_``; leading dots are dropped, so the
    result is never ``.``, ``..`` or hidden; an empty result is ``_``; a name longer than
    :data:`MAX_NAME` is cut and suffixed with a hash of the original, so distinct long names stay
    distinct. Equal inputs give equal outputs (the default output directories are stable).
    """
    text = str(name)
    out = _UNSAFE.sub("_", text).lstrip(".")
    out = re.sub(r"\.{2,}", ".", out) or "_"
    if len(out) > MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        out = f"{out[: MAX_NAME - 11]}-{digest}"
    return out


def confined_path(root: str | Path, *names: object) -> Path:
    """``root / safe_name(n1) / safe_name(n2) ...``, refused unless it resolves inside ``root``."""
    root = Path(root)
    path = root.joinpath(*(safe_name(n) for n in names))
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise GGDAError(
            f"{path} would resolve outside {root} (to {target}); choose another name or pass --out."
        )
    return path
