"""TCP (and Unix-socket) stream data paths over one connection lifecycle (lifecycle.py).

- epoll.py: a nested epoll in the event loop, one callback for every ready connection (Linux);
- protocol.py: an asyncio Protocol per connection (any platform; behind every gate);
- accept.py: accepting in batches, pausing when descriptors run out.
"""

from __future__ import annotations

from socket_echo.config import ConfigError
from socket_echo.tcp import epoll


def resolve_engine(name: str) -> str:
    """``--engine``: the data path that serves plain TCP and Unix listeners here;
    ConfigError (one line) for a path this platform lacks."""
    if name == "epoll" and not epoll.available():
        raise ConfigError("--engine epoll: this platform has no epoll (use --engine protocol)")
    if name == "auto":
        return "epoll" if epoll.available() else "protocol"
    return name
