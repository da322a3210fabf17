"""Progress bars that suit where stderr goes.

On a terminal a bar redraws itself in place, as tqdm does. When stderr is a file or a pipe (a
batch job, ``2> log``, CI) redrawing would write one endless line of carriage returns; there
:func:`progress` writes a plain status line at most every :data:`SPARSE_SECONDS` seconds
instead (plus the first one), so logs stay readable and small. Notebooks keep their widgets.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

SPARSE_SECONDS = 30.0
#: :class:`Iterations` shows nothing for a computation that ends within this many seconds.
DELAY_SECONDS = 2.0


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line (blank redraws —
    the clearing a ``leave=False`` bar does on close — are dropped)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = None

    def write(self, text: str) -> int:
        for part in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            if part.strip() and part.rstrip() != self.last:  # a bar closing where it stands: once
                self.last = part.rstrip()
                self.stream.write(self.last + "\n")
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


_bar = progress  # the bar of :class:`Iterations` (whose ``progress`` argument is the switch)


# -- on or off -------------------------------------------------------------------------------------
# Library computations report progress only when their caller asks: ``progress=True`` on the call,
# or :func:`set_default` (the ``ggda`` command line turns it on for the command it runs). Python
# code that calls the library directly sees nothing unless it asks.
_DEFAULT = {"on": False}


def set_default(on: bool) -> bool:
    """Whether library computations given ``progress=None`` report progress; returns the
    previous setting (to restore it)."""
    previous = _DEFAULT["on"]
    _DEFAULT["on"] = bool(on)
    return previous


def wanted(progress: bool | None) -> bool:
    """``progress`` itself when given, else the process default (off unless :func:`set_default`)."""
    return _DEFAULT["on"] if progress is None else bool(progress)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Iterations:
    """Progress of an iterative solve or a multi-pass fit: one step per iteration (or pass, or
    ``what`` is counted: rows, groups) with its current statistics (``residual=...``), on stderr.

    Nothing is shown for a computation that ends within :data:`DELAY_SECONDS`. After that, on a
    terminal it is a live bar; elsewhere a line at most every :data:`SPARSE_SECONDS` plus a last
    line with the final count and statistics (the bar is left, not cleared), so a log shows how
    many iterations a solve took and where it stopped. Disabled, it costs nothing and callers skip
    computing the statistics (``if it.on``).
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        progress: bool | None = None,
        what: str = "iteration",
        **kwargs: Any,
    ):
        self.on = wanted(progress)
        self.n, self.bar, self.started = 0, None, time.monotonic()
        kwargs.setdefault("bar_format", "{desc}: " + what + " {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        kwargs.setdefault("ncols", None)  # never cut the statistics off
        self._bar_args = {"total": total, "desc": desc, "leave": True, **kwargs}

    def step(self, n: int = 1, **stats: Any) -> None:
        """Count ``n`` iterations and show ``stats`` (e.g. ``residual=1e-4``)."""
        if not self.on:
            return
        if self.bar is None:
            waited = time.monotonic() - self.started
            if waited < DELAY_SECONDS:
                self.n += n
                return
            self.bar = _bar(initial=self.n, **self._bar_args)
            self.bar.start_t -= waited  # elapsed time counts from the start of the computation
        self.n += n
        if stats:
            self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Iterations:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
