"""Splitting SQL text into statements, for scripts, pipes and the shell.

A statement ends with ``;`` outside quotes (``'...'``, ``"..."``,
``$$...$$``) and comments (``-- ...``, ``/* ... */``).  Leading comments are
dropped from each statement so that the engine sees the statement keyword
first.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["split_statements", "is_complete"]


@dataclass
class _Scan:
    statements: list[str]
    rest: str            # text after the last ';' (may hold an unfinished statement)
    open_quote: bool     # the text ends inside a quote or block comment


def _scan(text: str) -> _Scan:
    statements: list[str] = []
    start: int | None = None   # first significant character of the current statement
    i, n = 0, len(text)
    rest_from = 0
    while i < n:
        ch = text[i]
        if ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if ch == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                return _Scan(statements, text[rest_from:], True)
            i = end + 2
            continue
        if ch.isspace():
            i += 1
            continue
        if start is None:
            start = i
        if ch in ("'", '"'):
            end = text.find(ch, i + 1)
            while end >= 0 and text.startswith(ch * 2, end):   # '' and "" escape themselves
                end = text.find(ch, end + 2)
            if end < 0:
                return _Scan(statements, text[rest_from:], True)
            i = end + 1
            continue
        if ch == "$" and text.startswith("$$", i):
            end = text.find("$$", i + 2)
            if end < 0:
                return _Scan(statements, text[rest_from:], True)
            i = end + 2
            continue
        if ch == ";":
            statement = text[start:i].strip()
            if statement != "":
                statements.append(statement)
            start = None
            rest_from = i + 1
        i += 1
    rest = text[start:].strip() if start is not None else ""
    return _Scan(statements, rest, False)


def split_statements(text: str) -> list[str]:
    """The statements of ``text``, without their ``;`` (a last one may lack it)."""
    scan = _scan(text)
    if scan.open_quote:
        return scan.statements + [scan.rest.strip()] if scan.rest.strip() else scan.statements
    return scan.statements + ([scan.rest] if scan.rest else [])


def is_complete(text: str) -> bool:
    """Whether ``text`` ends a statement (or holds nothing but whitespace and comments)."""
    scan = _scan(text)
    return not scan.open_quote and not scan.rest
