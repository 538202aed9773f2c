"""Plain-text tables for the admin commands (`watchout jobs`, `watchout report`)."""
from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """The header line, then a line per row: columns as wide as their widest cell, two spaces apart, no
    trailing spaces, no final newline. `align` has a character per column, `<` (left, the default for a
    column it leaves out) or `>` (right)."""
    lines = [tuple(headers), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    sides = align.ljust(len(headers), "<")
    return "\n".join("  ".join(cell.rjust(w) if side == ">" else cell.ljust(w)
                               for cell, w, side in zip(line, widths, sides)).rstrip()
                     for line in lines)
