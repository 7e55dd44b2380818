"""The one hex check every input path uses (query values, registration and upload fields)."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

_HEX = re.compile(r"[0-9A-Fa-f]*")
ANY_LENGTH = sys.maxsize  # max_length for values of no fixed size (CRLs, manifests)


def is_hex(value: object, lengths: tuple[int, ...] = (), max_length: int = 0) -> TypeGuard[str]:
    """A str of hex digits whose length is one of ``lengths`` or 1..``max_length``."""
    return (
        isinstance(value, str)
        and bool(_HEX.fullmatch(value))
        and (len(value) in lengths or 0 < len(value) <= max_length)
    )
