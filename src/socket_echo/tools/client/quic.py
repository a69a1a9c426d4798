"""``socket-echo client quic://``: a binary-safe pipe over one QUIC stream.

stdin goes out on stream 0 and the echo comes out on stdout as it arrives; when stdin ends a
FIN goes out, and the client exits 0 once the server's FIN came back after every byte, 1
otherwise (a reset, a closed connection, or nothing within the timeout).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.quic.events import QuicEvent, StreamDataReceived

from socket_echo.exits import FAILED, ToolError
from socket_echo.tools.connect.quic import QuicClient, QuicFailed, configuration, describe
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable

CHUNK = 64 * 1024


class PipeClient(QuicClient):
    """Writes stream 0's echo to stdout as it arrives instead of keeping it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echoed = 0
        self.out = sys.stdout.buffer

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id == 0:
            self.out.write(event.data)
            self.echoed += len(event.data)
            if event.end_stream:
                self.ended.add(0)
            self.changed.set()
            return
        super().quic_event_received(event)


async def pipe(target: Target, tls: TlsOptions | None, timeout: float, alpn: str) -> int:
    config = configuration(alpn, tls, target.host)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # a failed handshake is reported
    try:
        async with connect(
            target.host,
            target.port,
            configuration=config,
            create_protocol=PipeClient,
            wait_connected=False,
        ) as client:
            assert isinstance(client, PipeClient)
            client.transmit()
            try:
                await asyncio.wait_for(client.wait_connected(), timeout)
            except (asyncio.TimeoutError, ConnectionError):
                why = describe(client.terminated) if client.terminated else f"ALPN {alpn}"
                raise Unreachable(f"{target.url}: no QUIC handshake ({why})") from None
            sent = 0
            while chunk := await loop.run_in_executor(None, os.read, sys.stdin.fileno(), CHUNK):
                client.send(0, chunk)
                sent += len(chunk)
            client.send(0, b"", end=True)
            try:
                await client.until(lambda: 0 in client.ended, timeout, "the echo")
            except QuicFailed as exc:
                client.out.flush()
                raise ToolError(f"{exc} ({client.echoed} of {sent} B back)", FAILED) from None
            client.out.flush()
            if client.echoed != sent:
                raise ToolError(f"{client.echoed} of {sent} B came back", FAILED)
    except (Unreachable, ToolError):
        raise
    except OSError as exc:
        raise Unreachable(f"{target.url}: {exc.strerror or exc}") from None
    return 0


def run(target: Target, tls: TlsOptions | None, timeout: float, alpn: str) -> int:
    return asyncio.run(pipe(target, tls, timeout, alpn))
