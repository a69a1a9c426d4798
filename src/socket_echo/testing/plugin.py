"""The pytest plugin (entry point ``pytest11``): real echo servers as fixtures.

def test_conformance(echo_server):
    assert probe(echo_server.target).conforms

def test_tls(echo_server_factory):
    server = echo_server_factory("tls://127.0.0.1:0", tls_self_signed=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from socket_echo.testing import Server, serve


@pytest.fixture
def echo_server() -> Iterator[Server]:
    """socket-echo with TCP and UDP on 127.0.0.1, free ports; ``.target`` is the TCP one,
    ``.target_of("udp")`` the UDP one."""
    with serve() as server:
        yield server


@pytest.fixture
def echo_server_factory() -> Iterator[Callable[..., Server]]:
    """Servers with any listeners and settings (``serve``'s arguments), stopped after."""
    with contextlib.ExitStack() as stack:

        def make(*binds: str, **settings: Any) -> Server:
            return stack.enter_context(serve(*binds, **settings))

        yield make
