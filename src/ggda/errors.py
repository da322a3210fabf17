"""One exception type for bad user input.

Every message is a single line that says what is wrong *and how to fix it*; the CLI prints it
without a traceback. Library code raises :class:`GGDAError` (a ``ValueError``) so callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations


class GGDAError(ValueError):
    """Bad input or state that the user can fix; the message names the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
