"""Event loop choice: ``auto`` takes uvloop where it is installed, as uvicorn's loops/auto.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from socket_echo.config import ConfigError


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loop(name: str) -> str:
    if name == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    if name == "uvloop" and not uvloop_available():
        raise ConfigError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    return name


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if resolve_loop(name) == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]
    return asyncio.new_event_loop
