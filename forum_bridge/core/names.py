"""What a name typed by a person or read from a file may hold: nothing that cannot be seen.

A log-on or profile name with a byte order mark, a zero-width space or a control character looks
exactly like another name on screen, yet never equals it, so it must be refused where names are
validated rather than stored.
"""

from __future__ import annotations

import unicodedata

# Controls, format characters (byte order mark, zero-width space and joiners, direction marks, soft
# hyphen), surrogates, private use, unassigned code points, and every kind of space or separator.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def invisible_character(value: str) -> str | None:
    """The first character of ``value`` that cannot be seen, as ``U+XXXX``, or None."""
    for char in value:
        if unicodedata.category(char) in _INVISIBLE:
            return f"U+{ord(char):04X}"
    return None
