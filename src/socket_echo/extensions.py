"""Whether the native extensions may run: ``SOCKET_ECHO_NO_EXTENSIONS=1`` forces the pure-Python
twins (aiohttp's AIOHTTP_NO_EXTENSIONS), read here and nowhere else at run time (setup.py reads
it at install time, before this package exists). Read at each call, not once at import: a
test sets it for one run. A leaf: imports nothing of socket_echo."""

from __future__ import annotations

import os

NO_EXTENSIONS = "SOCKET_ECHO_NO_EXTENSIONS"


def disabled() -> bool:
    """SOCKET_ECHO_NO_EXTENSIONS is set (to anything but the empty string)."""
    return bool(os.environ.get(NO_EXTENSIONS))
