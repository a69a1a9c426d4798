"""The reference QUIC echo for benchmarks/secure.py: net-tools' ``quic-echo-server.py`` idea
of a server, a bare aioquic echo (every stream's bytes back as they arrive, FIN mirrored), with
no limits, counters or logs, so the difference to socket-echo's quic:// is what socket-echo adds.

    python benchmarks/quic_echo_bare.py PORT CERT KEY
"""

from __future__ import annotations

import asyncio
import sys

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived


class Echo(QuicConnectionProtocol):
    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, event.end_stream)
            self.transmit()


async def main(port: int, cert: str, key: str) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=["echo-quic"])
    config.load_cert_chain(cert, key)
    await serve("127.0.0.1", port, configuration=config, create_protocol=Echo)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
