"""Progress bars that suit where stderr goes.

On a terminal a bar redraws itself in place, as tqdm does. When stderr is a file or a pipe (a
batch job, ``2> log``, CI) redrawing would write one endless line of carriage returns; there
:func:`progress` writes a plain status line at most every :data:`SPARSE_SECONDS` seconds
instead (plus the first one), so logs stay readable and small. Notebooks keep their widgets.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

SPARSE_SECONDS = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line (blank redraws —
    the clearing a ``leave=False`` bar does on close — are dropped)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for part in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, *, disable: bool = False, leave: bool = False, **kwargs: Any):
    """A tqdm bar (``tqdm.auto``) on stderr; sparse plain lines when stderr is not a terminal."""
    from tqdm.auto import tqdm
    from tqdm.autonotebook import tqdm as display_tqdm
    from tqdm.std import tqdm as std_tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    if not disable and display_tqdm is std_tqdm and not _isatty(stream):
        kwargs.setdefault("mininterval", SPARSE_SECONDS)
        kwargs.setdefault("maxinterval", max(SPARSE_SECONDS, kwargs["mininterval"]))
        kwargs.setdefault("ncols", 80)
        kwargs.setdefault("ascii", True)
        stream = _Lines(stream)
    return tqdm(iterable, file=stream, disable=disable, leave=leave, **kwargs)
