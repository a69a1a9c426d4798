"""Which TCP data path serves plain TCP and Unix listeners here (``--engine``). Apart from
the package's ``__init__`` so importing any one path loads no other."""

from __future__ import annotations

from socket_echo.config import ConfigError
from socket_echo.tcp import epoll, native


def resolve_engine(name: str) -> str:
    """``--engine``: the data path that serves plain TCP and Unix listeners here;
    ConfigError (one line) for a path this platform lacks."""
    if name == "native" and not native.available():
        raise ConfigError(
            f"--engine native: {native.why_unavailable()} (use --engine epoll or protocol)"
        )
    if name == "epoll" and not epoll.available():
        raise ConfigError("--engine epoll: this platform has no epoll (use --engine protocol)")
    if name == "auto":
        if native.available():
            return "native"
        return "epoll" if epoll.available() else "protocol"
    return name
