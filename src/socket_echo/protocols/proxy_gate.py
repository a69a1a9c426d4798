"""``tcp+proxy://`` listeners: read the PROXY header, then echo as the real client's address.

The header must arrive within ``HEADER_TIMEOUT`` seconds (one timer per connection, cancelled
when the header is complete: not per message); a malformed, oversized or missing one closes
the connection, is counted by reason and logged. Bytes that came with the header go to the
echo, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, cast

from socket_echo.logs import log_event
from socket_echo.protocols.proxy import HEADER_TIMEOUT, V2_MAX, ProxyHeaderError, parse
from socket_echo.protocols.tcp import ConnectionContext, EchoProtocol, format_peer


class ProxyStats:
    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()


class ProxyGate(asyncio.Protocol):
    def __init__(self, ctx: ConnectionContext, stats: ProxyStats) -> None:
        self.ctx = ctx
        self.stats = stats
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.ctx.loop.call_later(
            HEADER_TIMEOUT, self._reject, f"no PROXY header within {HEADER_TIMEOUT:g} s"
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            header = parse(self.buffer)
        except ProxyHeaderError as exc:
            self._reject(str(exc))
            return
        if header is None:
            if len(self.buffer) > V2_MAX:  # parse() bounds both versions; belt and braces
                self._reject("oversized PROXY header")
            return
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        echo = EchoProtocol(self.ctx, peer=header.source)
        self.transport.set_protocol(echo)
        echo.connection_made(self.transport)
        rest = self.buffer[header.length :]
        self.buffer = b""
        if rest:
            echo.data_received(rest)

    def eof_received(self) -> bool:
        self._reject("closed before a complete PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _reject(self, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.stats.rejected[reason.split(":")[0]] += 1
        assert self.transport is not None
        peer = format_peer(self.transport.get_extra_info("peername"))
        self.transport.abort()
        log_event(
            logging.INFO if self.ctx.access_log else logging.DEBUG,
            "proxy_rejected",
            f"PROXY header from {peer} rejected: {reason}",
            listener=self.ctx.listener,
            peer=peer,
            reason=reason,
        )


def gate_factory(ctx: ConnectionContext, stats: ProxyStats) -> Any:
    def factory() -> ProxyGate:
        return ProxyGate(ctx, stats)

    return factory
