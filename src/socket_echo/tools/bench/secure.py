"""``bench`` over ``quic://`` and ``dtls://``: a worker per process on asyncio, verifying every
byte as the TCP and UDP workers do, with the same figures (model.WorkerResult).

aioquic and pyOpenSSL's record layer are driven from Python on both ends, so one client
process costs about as much per message as the server: give the load more processes (``-p``)
than the server has cores, and read ``client_saturated`` in the results.

Modes: ``pingpong`` (each connection one stream, or one DTLS session: a message, its whole
echo, the next), ``stream`` (QUIC only: one stream per connection, writes kept in flight up
to a window, the echo verified as it comes), ``churn`` (handshake, one echo, close: requests/s
is handshakes/s).

``--rate`` (ping-pong): the open loop, as the TCP loops keep it. Each connection sends on a
schedule (uniform or Poisson), up to ``--in-flight`` messages unanswered, each timed from its
slot (corrected) and from its send; a QUIC stream keeps order (echoes matched by position), a
DTLS echo is matched by its bytes (every message differs) and one not back within --timeout
is lost. asyncio's timers are coarser than the C loop's: a send counts as late past
ASYNC_LATE_SEND_US (1 ms, said in the output), not 10 µs.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from socket_echo.tools.bench import errors
from socket_echo.tools.bench.model import BenchConfig, WorkerResult, cpu_seconds
from socket_echo.tools.connect.dtls import DtlsFailed, open_dtls
from socket_echo.tools.connect.patterns import Patterns
from socket_echo.tools.connect.quic import configuration
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable
from socket_echo.tools.defaults import ASYNC_LATE_SEND_US

STREAM_WINDOW = 4  # writes in flight per QUIC stream in stream mode


class BenchQuic(QuicConnectionProtocol):
    """Collects stream 0's echo and wakes the worker once ``want`` bytes are there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buf = bytearray()
        self.want = 0
        self.ready = asyncio.Event()
        self.closed: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.buf += event.data
            if len(self.buf) >= self.want:
                self.ready.set()
        elif isinstance(event, ConnectionTerminated):
            self.closed = event.reason_phrase or f"error {event.error_code:#x}"
            self.ready.set()

    async def collect(self, n: int, timeout: float) -> bytes:
        self.want = n
        while len(self.buf) < n:
            if self.closed is not None:
                raise ConnectionError(f"connection closed: {self.closed}")
            self.ready.clear()
            await asyncio.wait_for(self.ready.wait(), timeout)
        got = bytes(self.buf[:n])
        del self.buf[:n]
        return got

    def write(self, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(0, data, end_stream=end)
        self.transmit()


def quic_config(cfg: BenchConfig) -> QuicConfiguration:
    return configuration(cfg.alpn, cfg.tls, cfg.target.host)  # probe's: one place for it


class SecureWorker:
    def __init__(
        self, cfg: BenchConfig, connections: int, rate: float, index: int, progress: Any
    ) -> None:
        self.cfg, self.n, self.index, self.progress = cfg, connections, index, progress
        self.rate = rate  # this worker's share of --rate; 0: the closed loop
        self.slot_index = 0  # the next connection's place in the schedule
        self.rng = random.Random(index)
        self.result = WorkerResult()
        if rate:
            self.result.late_send_threshold_us = ASYNC_LATE_SEND_US
        self.patterns = Patterns(cfg.size)
        self.deadline = 0.0
        self.seq = index

    def run(self) -> WorkerResult:
        cpu0 = cpu_seconds()
        asyncio.run(self._main())
        measured = time.monotonic() - self.result.mono_start  # the window, not the teardown
        self.result.elapsed = max(1e-9, min(measured, self.cfg.duration))
        self.result.cpu_seconds = cpu_seconds() - cpu0
        if self.cfg.mode != "stream":
            self.result.bytes = self.result.requests * self.cfg.size * 2
        return self.result

    async def _main(self) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        self.result.begin(time.monotonic() + self.cfg.warmup)
        self.deadline = time.perf_counter() + self.cfg.warmup + self.cfg.duration
        scheme, mode = self.cfg.target.scheme, self.cfg.mode
        body = getattr(self, f"_{scheme}_{mode}" + ("_open" if self.rate else ""))
        self.start = time.perf_counter()
        ticker = asyncio.ensure_future(self._tick())
        await asyncio.gather(*(self._guarded(body) for _ in range(self.n)))
        ticker.cancel()
        self.progress.value = self.result.requests

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.progress.value = (
                self.result.bytes if self.cfg.mode == "stream" else self.result.requests
            )

    async def _guarded(self, body: Any) -> None:
        """One connection's loop; a failure is counted and the connection replaced, until the
        run ends (with a pause, so a dead server is not hammered)."""
        while time.perf_counter() < self.deadline:
            try:
                await body()
                return
            except (asyncio.TimeoutError, TimeoutError):
                self.result.errors[errors.NO_COMPLETE_ANSWER] += 1
            except (ConnectionError, OSError, DtlsFailed, Unreachable) as exc:
                self.result.errors[str(exc) or type(exc).__name__] += 1
            await asyncio.sleep(0.05)

    def _message(self) -> bytes:
        self.seq += 1
        return self.patterns.message(self.seq)

    def _count(self, started: float) -> None:
        now = time.perf_counter()
        self.result.record(int((now - started) * 1e6), time.monotonic())

    # -- QUIC ----------------------------------------------------------------------------
    def _quic_connect(self) -> Any:
        cfg = self.cfg
        return quic_connect(
            cfg.target.host, cfg.target.port, configuration=quic_config(cfg),
            create_protocol=BenchQuic,
        )  # fmt: skip

    async def _quic_pingpong(self) -> None:
        async with self._quic_connect() as client:
            assert isinstance(client, BenchQuic)
            while time.perf_counter() < self.deadline:
                message = self._message()
                started = time.perf_counter()
                client.write(message)
                echo = await client.collect(len(message), self.cfg.timeout)
                if echo != message:
                    self.result.mismatches += 1
                    return
                self._count(started)

    async def _quic_churn(self) -> None:
        """aioquic's connect() waits out the closing period (three PTOs) on exit: that wait
        runs in the background, so requests/s counts handshakes, not closing timers."""
        closing: set[asyncio.Task[Any]] = set()
        try:
            while time.perf_counter() < self.deadline:
                started = time.perf_counter()
                session = self._quic_connect()
                client = await session.__aenter__()
                assert isinstance(client, BenchQuic)
                try:
                    message = self._message()
                    client.write(message, end=True)
                    echo = await client.collect(len(message), self.cfg.timeout)
                finally:
                    closing = {t for t in closing if not t.done()}
                    closing.add(asyncio.ensure_future(session.__aexit__(None, None, None)))
                if echo != message:
                    self.result.mismatches += 1
                    return
                self._count(started)
        finally:
            await asyncio.gather(*closing, return_exceptions=True)

    async def _quic_stream(self) -> None:
        async with self._quic_connect() as client:
            assert isinstance(client, BenchQuic)
            in_flight: list[bytes] = []
            while time.perf_counter() < self.deadline or in_flight:
                while len(in_flight) < STREAM_WINDOW and time.perf_counter() < self.deadline:
                    message = self._message()
                    client.write(message)
                    in_flight.append(message)
                message = in_flight.pop(0)
                if await client.collect(len(message), self.cfg.timeout) != message:
                    self.result.mismatches += 1
                    return
                if time.monotonic() >= self.result.mono_start:  # not in the warm-up
                    self.result.bytes += len(message)
                    self.result.requests += 1

    async def _quic_pingpong_open(self) -> None:
        async with self._quic_connect() as client:
            assert isinstance(client, BenchQuic)
            size = self.cfg.size

            async def receive() -> bytes | None:
                return await client.collect(size, self.cfg.timeout)

            await self._open_loop(client.write, receive, ordered=True)

    async def _open_loop(
        self,
        send: Callable[[bytes], None],
        receive: Callable[[], Awaitable[bytes | None]],
        ordered: bool,
    ) -> None:
        """One connection's open loop: a sender on the schedule, a receiver matching echoes
        to what is in flight (by position on a stream, by bytes for datagrams)."""
        res, cfg = self.result, self.cfg
        n = max(1, self.n)
        interval = n / self.rate
        slot = self.start + interval * (self.slot_index % n) / n  # the warm-up's sends too
        self.slot_index += 1
        mstart = self.start + cfg.warmup
        pending: collections.OrderedDict[bytes, tuple[float, float]] = collections.OrderedDict()
        gone: set[bytes] = set()  # counted lost: their echo may still come (late)
        room = asyncio.Event()
        failed: list[str] = []

        async def sender() -> None:
            nonlocal slot
            while slot < self.deadline and not failed:
                wait = slot - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                held = False
                while len(pending) >= cfg.in_flight and not failed:
                    held = True  # the server has not answered enough: wait for an echo
                    room.clear()
                    await room.wait()
                message = self._message()
                now = time.perf_counter()
                pending[message] = (slot, now)
                send(message)
                if slot >= mstart:
                    res.sends += 1
                    late_us = int((now - slot) * 1e6)
                    res.lateness_us[late_us] += 1
                    if late_us > res.late_send_threshold_us:
                        if held:
                            res.held_sends += 1
                        else:
                            res.late_sends += 1
                slot += self._gap(interval)

        async def receiver() -> None:
            while not failed and (pending or time.perf_counter() < self.deadline):
                if not pending:
                    await asyncio.sleep(0.001)
                    continue
                echo = await receive()
                now = time.perf_counter()
                if echo is None:  # a datagram not answered within the timeout: lost
                    oldest = next(iter(pending))
                    if now - pending[oldest][1] >= cfg.timeout:
                        pending.popitem(last=False)
                        gone.add(oldest)
                        res.lost += 1
                        room.set()
                    continue
                if ordered:
                    expected = next(iter(pending))
                    if echo != expected:
                        res.mismatches += 1
                        failed.append("mismatch")
                        return
                elif echo not in pending:
                    if echo in gone:
                        gone.discard(echo)
                        res.late += 1
                    else:
                        res.mismatches += 1
                    continue
                intended, sent = pending.pop(echo)
                room.set()
                if intended >= mstart:
                    res.record(int((now - intended) * 1e6), time.monotonic())
                    res.uncorrected_us[int((now - sent) * 1e6)] += 1

        await asyncio.gather(sender(), receiver())

    def _gap(self, interval: float) -> float:
        if self.cfg.arrival == "poisson":
            return -math.log(1.0 - self.rng.random()) * interval
        return interval

    # -- DTLS ----------------------------------------------------------------------------
    async def _dtls_pingpong(self) -> None:
        client = await open_dtls(self.cfg.target, self.cfg.tls, self.cfg.timeout)
        unanswered: set[bytes] = set()  # messages counted lost: their echo may still come
        try:
            while time.perf_counter() < self.deadline:
                message = self._message()
                started = time.perf_counter()
                client.send(message)
                while (echo := await client.recv(self.cfg.timeout)) in unanswered:
                    unanswered.discard(echo)
                    self.result.late += 1
                if echo is None:
                    self.result.lost += 1  # the next message goes out
                    unanswered.add(message)
                    continue
                if echo != message:
                    self.result.mismatches += 1
                    return
                self._count(started)
        finally:
            client.close()

    async def _dtls_pingpong_open(self) -> None:
        client = await open_dtls(self.cfg.target, self.cfg.tls, self.cfg.timeout)
        try:

            async def receive() -> bytes | None:
                return await client.recv(min(self.cfg.timeout, 0.05))

            await self._open_loop(client.send, receive, ordered=False)
        finally:
            client.close()

    async def _dtls_churn(self) -> None:
        while time.perf_counter() < self.deadline:
            started = time.perf_counter()
            client = await open_dtls(self.cfg.target, self.cfg.tls, self.cfg.timeout)
            try:
                message = self._message()
                client.send(message)
                echo = await client.recv(self.cfg.timeout)
            finally:
                client.close()
            if echo is None:
                self.result.lost += 1
                continue
            if echo != message:
                self.result.mismatches += 1
                return
            self._count(started)


def check_reachable(target: Target, tls: TlsOptions | None, timeout: float, alpn: str) -> None:
    """One handshake before the run: Unreachable (one line) when it fails, so a wrong port,
    certificate or ALPN is said once instead of counted as errors for the whole run."""

    async def attempt() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        if target.scheme == "dtls":
            try:
                (await open_dtls(target, tls, timeout)).close()
            except DtlsFailed as exc:
                raise Unreachable(f"{target.url}: {exc}") from None
            return
        cfg = BenchConfig(target=target, timeout=timeout, tls=tls, alpn=alpn)
        async with quic_connect(
            target.host, target.port, configuration=quic_config(cfg),
            create_protocol=BenchQuic, wait_connected=False,
        ) as client:  # fmt: skip
            assert isinstance(client, BenchQuic)
            client.transmit()
            try:
                await asyncio.wait_for(client.wait_connected(), timeout)
            except (asyncio.TimeoutError, ConnectionError):
                why = client.closed or f"ALPN {alpn}"
                raise Unreachable(f"{target.url}: no QUIC handshake ({why})") from None

    asyncio.run(attempt())
