"""Text that comes from outside (class names are folder names) made safe to show.

A folder name can hold anything but '/' and NUL: terminal escape sequences that clear the screen or
retitle the window, tabs and newlines that break a table, right-to-left overrides that reorder what
follows. `printable` shows such characters as escapes (\\x1b, \\t, \\u202e), the way Python's repr
does, and leaves every other character, accents and CJK included, as it is.
"""

from __future__ import annotations

import unicodedata


def escape_char(c: str) -> str:
    """One character as Python writes it in a string literal: \\t, \\x1b, \\u732b, \\U0001f431."""
    o = ord(c)
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(c) or (f"\\x{o:02x}" if o < 0x100 else
                                                            f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")


def printable(text: str) -> str:
    """`text` with control and format characters (Unicode Cc, Cf) escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(escape_char(c) if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def printable_lines(text: str) -> str:
    """Each line of a message made `printable` (the message's own line breaks kept)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))
