"""Write one benchmark's section of ``benchmarks/RESULTS.md``, leaving the others alone."""

from __future__ import annotations

from pathlib import Path

__all__ = ["update_section"]


def _section_end(lines: list[str], start: int) -> int:
    """The line after section ``start``: the next ``## `` heading, or the end."""
    return next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))


def update_section(path: Path, heading: str, body: str, *, after: str | None = None) -> None:
    """Replace the section under ``heading`` with ``body``; a new section goes after the
    section ``after`` when there is one, else at the end."""
    text = path.read_text() if path.exists() else "# Shoal benchmark results\n"
    lines = text.splitlines(keepends=True)
    new = heading + "\n\n" + body.rstrip("\n") + "\n\n"
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    anchor = next((i for i, line in enumerate(lines) if line.strip() == after), None) if after else None
    if start is not None:
        text = "".join(lines[:start]) + new + "".join(lines[_section_end(lines, start):])
    elif anchor is not None:
        end = _section_end(lines, anchor)
        text = "".join(lines[:end]) + new + "".join(lines[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + new
    path.write_text(text.rstrip("\n") + "\n")
