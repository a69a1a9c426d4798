"""The tools' QUIC client side (aioquic): the configuration a target and the TLS options make,
and a connection protocol that collects each stream's echo, resets, datagrams and the close,
which probe and client drive (bench keeps a leaner one of its own)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from socket_echo.tools.connect.target import TlsOptions


class QuicFailed(Exception):
    """A step failed; the message names why."""


class QuicClient(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.got: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.datagrams: list[bytes] = []
        self.terminated: ConnectionTerminated | None = None
        self.changed = asyncio.Event()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.got.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.ended.add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.reset[event.stream_id] = event.error_code
        elif isinstance(event, DatagramFrameReceived):
            self.datagrams.append(event.data)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        self.changed.set()

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    async def until(self, check: Any, timeout: float, what: str) -> None:
        async def wait() -> None:
            while not check():
                if self.terminated is not None:
                    raise QuicFailed(f"connection closed: {describe(self.terminated)}")
                for sid, code in self.reset.items():
                    raise QuicFailed(f"stream {sid} reset by the server (error {code})")
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise QuicFailed(
                f"{what}: nothing more within {timeout:g} s (flow-control stall?)"
            ) from None


def describe(event: ConnectionTerminated) -> str:
    phrase = f": {event.reason_phrase}" if event.reason_phrase else ""
    return f"error {event.error_code:#x}{phrase}"


def configuration(alpn: str, tls: TlsOptions | None, host: str) -> QuicConfiguration:
    name = (tls.server_name if tls is not None else None) or host
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=name)
    config.max_datagram_frame_size = 65536
    if tls is not None and tls.insecure:
        config.verify_mode = ssl.CERT_NONE
    elif tls is not None and tls.ca_file:
        tls.context()  # aioquic reads the file only in the handshake: a bad one, one line now
        config.load_verify_locations(tls.ca_file)
    return config
