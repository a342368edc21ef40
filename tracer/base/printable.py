"""Text from a recording or a dataset made safe for a terminal: hostnames,
kernels, labels, paths and anomaly details are data, and a value holding an
escape sequence must not move the cursor, retitle the window or hide the
text after it."""
from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls, lone surrogates, and the bidi
# overrides that reorder what follows
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def _escape(m: "re.Match[str]") -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(s: object) -> str:
    """S with every control character shown as its escape (``\\x1b``), so a
    line stays one line and nothing in it reaches the terminal as a command."""
    return _UNSAFE.sub(_escape, str(s))
