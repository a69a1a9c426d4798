"""``probe quic://``: checks any QUIC echo server the way Zephyr's QUIC echo client uses one,
and names what fails (ALPN refused, handshake, stream reset, a flow-control stall, wrong bytes).

Steps: the handshake (with ALPN); Zephyr's pattern (3 streams, random 1-1199 B prefixes of a
text, each echo awaited before the next round, no FIN between rounds); a FIN mirrored after
the last byte; 100 streams at once; 1 MiB on one stream; RFC 9221 datagrams when the server
offers them (a finding, not a failure, when it does not: Zephyr's stack has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from aioquic.asyncio.client import connect

from socket_echo.config import DEFAULT_QUIC_ALPN
from socket_echo.tools.connect.quic import QuicClient, QuicFailed, configuration, describe
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable
from socket_echo.tools.probe.steps import FAIL, FINDING, PASS, SKIP, Step

DEFAULT_ALPN = DEFAULT_QUIC_ALPN[0]
TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. "
) * 12
ZEPHYR_MAX = 1199
ROUNDS = 10


class QuicProbe:
    def __init__(
        self,
        target: Target,
        timeout: float,
        tls: TlsOptions | None,
        alpn: str = DEFAULT_ALPN,
        quick: bool = False,
    ) -> None:
        self.target, self.timeout, self.tls, self.alpn = target, timeout, tls, alpn
        self.quick = quick  # the handshake and one echo: a health check
        self.steps: list[Step] = []
        self.rng = random.Random(4422)

    async def _step(self, name: str, fn: Any) -> Step:
        started = time.perf_counter()
        try:
            status, detail = await fn()
        except QuicFailed as exc:
            status, detail = FAIL, str(exc)
        except (ConnectionError, OSError) as exc:
            status, detail = FAIL, f"{type(exc).__name__}: {exc}"
        step = Step(name, status, detail, time.perf_counter() - started, {})
        self.steps.append(step)
        return step

    async def run(self) -> list[Step]:
        config = configuration(self.alpn, self.tls, self.target.host)
        try:
            async with connect(
                self.target.host,
                self.target.port,
                configuration=config,
                create_protocol=QuicClient,
                wait_connected=False,
            ) as client:
                assert isinstance(client, QuicClient)
                step = await self._step("handshake", lambda: self._handshake(client))
                if step.status == FAIL:  # nothing to measure: the exit table's 2
                    raise Unreachable(f"{self.target.url}: {step.detail}")
                if self.quick:
                    await self._step("FIN mirrored", lambda: self._fin(client))
                    return self.steps
                await self._step("Zephyr client pattern", lambda: self._zephyr(client))
                await self._step("FIN mirrored", lambda: self._fin(client))
                await self._step("100 streams at once", lambda: self._many(client))
                await self._step("1 MiB on one stream", lambda: self._bulk(client))
                await self._step("datagrams (RFC 9221)", lambda: self._datagrams(client))
        except Unreachable:
            raise
        except OSError as exc:
            raise Unreachable(f"{self.target.url}: {exc.strerror or exc}") from None
        return self.steps

    async def _handshake(self, client: QuicClient) -> tuple[str, str]:
        client.transmit()  # connect(wait_connected=False) has not sent the Initial yet
        try:
            await asyncio.wait_for(client.wait_connected(), self.timeout)
        except asyncio.TimeoutError:
            raise QuicFailed(
                f"no handshake within {self.timeout:g} s (nothing listening?)"
            ) from None
        except ConnectionError:
            event = client.terminated
            if event is not None and event.error_code & 0xFF == 0x78:  # no_application_protocol
                raise QuicFailed(f"ALPN {self.alpn!r} refused by the server") from None
            raise QuicFailed(
                f"handshake failed: {describe(event) if event else 'connection closed'}"
            ) from None
        return PASS, f"QUIC v1, ALPN {self.alpn}"

    def _next_stream(self, client: QuicClient) -> int:
        return int(client._quic.get_next_available_stream_id())

    async def _zephyr(self, client: QuicClient) -> tuple[str, str]:
        expected: dict[int, bytearray] = {}
        for _ in range(3):
            sid = self._next_stream(client)
            chunk = TEXT[: self.rng.randint(1, ZEPHYR_MAX)]
            expected[sid] = bytearray(chunk)
            client.send(sid, chunk)  # opens the stream: the next id is another one
        for round_ in range(ROUNDS):
            for sid, want in expected.items():
                size = len(want)
                await client.until(
                    lambda s=sid, n=size: len(client.got.get(s, b"")) >= n,
                    self.timeout,
                    f"stream {sid}, round {round_ + 1}",
                )
                if client.got[sid] != want:
                    raise QuicFailed(f"stream {sid}, round {round_ + 1}: the echo differs")
                chunk = TEXT[: self.rng.randint(1, ZEPHYR_MAX)]
                want.extend(chunk)
                client.send(sid, chunk)
        return PASS, f"3 streams x {ROUNDS} rounds, each echo awaited, no FIN between rounds"

    async def _fin(self, client: QuicClient) -> tuple[str, str]:
        sid = self._next_stream(client)
        client.send(sid, b"last bytes, then FIN", end=True)
        await client.until(lambda: sid in client.ended, self.timeout, "FIN")
        if bytes(client.got[sid]) != b"last bytes, then FIN":
            raise QuicFailed("the bytes before the FIN differ")
        return PASS, "echo, then FIN"

    async def _many(self, client: QuicClient) -> tuple[str, str]:
        ids = []
        for i in range(100):
            sid = self._next_stream(client)
            client.send(sid, b"stream %03d" % i, end=True)
            ids.append(sid)
        await client.until(lambda: client.ended >= set(ids), self.timeout, "100 streams")
        wrong = [sid for i, sid in enumerate(ids) if bytes(client.got[sid]) != b"stream %03d" % i]
        if wrong:
            raise QuicFailed(f"{len(wrong)} stream(s) got another stream's bytes")
        return PASS, "100 of 100 echoed and closed"

    async def _bulk(self, client: QuicClient) -> tuple[str, str]:
        data = self.rng.randbytes(1 << 20)
        sid = self._next_stream(client)
        started = time.perf_counter()
        client.send(sid, data, end=True)
        await client.until(lambda: sid in client.ended, self.timeout * 4, "1 MiB")
        if bytes(client.got[sid]) != data:
            raise QuicFailed("the echo of 1 MiB differs")
        rate = len(data) / (time.perf_counter() - started) / 1e6
        return PASS, f"byte-exact, {rate:.1f} MB/s"

    async def _datagrams(self, client: QuicClient) -> tuple[str, str]:
        if not client._quic._remote_max_datagram_frame_size:
            return SKIP, "the server offers no datagrams (Zephyr's stack has none)"
        sent = [b"datagram %d" % i for i in range(5)]
        for payload in sent:
            client._quic.send_datagram_frame(payload)
        client.transmit()
        with contextlib.suppress(QuicFailed):  # count what came back
            await client.until(lambda: len(client.datagrams) >= 5, min(self.timeout, 2.0), "x")
        got = sum(1 for p in sent if p in client.datagrams)
        if got == 0:
            return FAIL, "offered, but none of 5 datagrams came back"
        return (PASS if got == 5 else FINDING), f"{got} of 5 echoed"


def run(
    target: Target, timeout: float, tls: TlsOptions | None, alpn: str, quick: bool = False
) -> list[Step]:
    async def main() -> list[Step]:
        # A handshake that timed out leaves aioquic's waiter to fail later, unawaited: that
        # is reported as the step's failure already, not as a stray traceback.
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        return await QuicProbe(target, timeout, tls, alpn, quick).run()

    return asyncio.run(main())
