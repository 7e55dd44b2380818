"""JSON from clients, parsed with bounded nesting.

Python's parser recurses once per ``[``/``{``: a body (or a JSON document inside a string, as
an upload's identities and ``*_raw`` fields are) nested a few thousand deep raises
RecursionError there, or later in whatever walks the result (comparison, ``json.dumps``).
:func:`loads` measures the nesting before parsing, in C-speed passes over the text, and
refuses anything deeper than :data:`MAX_DEPTH` with :class:`JsonTooDeep`, a ValueError, so
callers that already refuse invalid JSON refuse it the same way (a 400, never a 500).

Nothing Intel publishes comes near the bound: a TCB info is 6 levels deep, an upload 7.
"""

from __future__ import annotations

import json
from array import array
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64

# Brackets as signed bytes: openers +1, closers -1 (0xFF).
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))


class JsonTooDeep(ValueError):
    """JSON nested deeper than allowed."""


def nesting_depth(text: str | bytes | bytearray) -> int:
    """How deep ``text`` nests arrays and objects (0 for a scalar). Exact for valid JSON; for
    invalid JSON some number the parser will refuse anyway."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"[" not in data and b"{" not in data:
        return 0
    # Brackets inside strings are not structure. Escapes first: left to right, every two
    # backslashes are an escaped backslash, and after those every backslash-quote an escaped
    # quote; the quotes left
    # then delimit strings, so every other piece between them is outside a string.
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _NOT_STRUCTURE)
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[0::2])
    steps = array("b", structure.translate(_BRACKETS))
    return max(accumulate(steps), default=0)


def check_depth(text: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> None:
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonTooDeep(f"JSON nested {depth} deep (at most {max_depth} accepted)")


def loads(text: str | bytes | bytearray, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads`` refusing nesting deeper than ``max_depth`` (:class:`JsonTooDeep`)."""
    check_depth(text, max_depth)
    try:
        return json.loads(text, **kwargs)
    except RecursionError:  # cannot happen after the check; kept as a last line of defence
        raise JsonTooDeep("JSON nested too deeply") from None
