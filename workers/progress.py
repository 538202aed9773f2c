"""Progress of a long command on a terminal: one line rewritten in place, nothing when piped."""
from __future__ import annotations

from typing import TextIO


class Progress:
    """`step(label, done, total)` rewrites one line on `stream` if it is a terminal; `end()` clears it."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None and stream.isatty() else None
        self._shown = False

    def step(self, label: str, done: int, total: int) -> None:
        if self._stream is None or total <= 0:
            return
        self._stream.write(f"\r\x1b[K{label}: {done}/{total} ({100 * done // total}%)")
        self._stream.flush()
        self._shown = True

    def end(self) -> None:
        if self._stream is not None and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


QUIET = Progress(None)
