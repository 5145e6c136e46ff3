"""Untrusted values made safe for one line of a terminal: control characters shown as escapes, long values cut.

A sweep file, a run store or a command line can carry any text; before it reaches the terminal, ESC, CSI, OSC,
newlines and the bidirectional overrides become visible escapes (`\\x1b`, `\\n`, `\\u202e`), so a value can neither
recolour nor retitle the terminal nor break a table or a one-line message. Reprs are built in bounded time,
however big (or alias-shared) a value is.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

SHOWN = 80  # characters of an offending value quoted in a message
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxarray = _REPR.maxlong = 6


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(text: str) -> str:
    """`text` with every control character (and line/bidi control) replaced by its visible escape."""
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


def printable_lines(text: str) -> str:
    """`text` made printable line by line: its line breaks are kept (a table cell may span lines)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def clip(text: str, limit: int = SHOWN) -> str:
    """`text` cut to at most `limit` characters, '...' marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def shown(value: Any, limit: int = SHOWN) -> str:
    """The repr of a value for a message: bounded work, control characters escaped, at most `limit` characters."""
    return clip(printable(_REPR.repr(value)), limit)


def no_control(value: str | None) -> None:
    """ValueError naming `value` when it holds a control character (a setting that reaches a command line)."""
    if value is not None and _CONTROL.search(value):
        raise ValueError(f"contains a control character (newline, tab, ...): {shown(value)}")
