"""``probe dtls://``: checks any DTLS 1.2 echo server the way Zephyr's echo_client and
net-tools' ``dtls-client`` use one, and names what fails.

Steps: the handshake, with whether the server asked for a cookie (a HelloVerifyRequest: a
server that answers an unverified ClientHello with its whole first flight is an amplifier,
reported as a finding); net-tools' payload set, one record each, each echo one record and
byte-exact (1 s read timeout, 5 tries, as dtls-client.c); a 1200-byte record; Zephyr's
echo_client pattern (random 1-1159 B prefixes of its text); a handshake under loss (this
client loses its second datagram out and its second datagram in, so both sides' retransmission
timers must work).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from socket_echo.tools.connect.dtls import DtlsClient, DtlsFailed, open_dtls
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable
from socket_echo.tools.probe.steps import FAIL, FINDING, PASS, Step

TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. "
) * 10
ZEPHYR_MAX = 1159
NET_TOOLS_PAYLOADS = (  # dtls-client.c's set
    b"A",
    b"foobar",
    b"\x00\x01\x02\x03",
    b"The quick brown fox jumps",
    TEXT[:1024],
    b"\x00",
    bytes(range(256)),
)
READ_TIMEOUT, TRIES = 1.0, 5  # dtls-client.c's


class DtlsProbe:
    def __init__(
        self, target: Target, timeout: float, tls: TlsOptions | None, quick: bool = False
    ) -> None:
        self.target, self.timeout, self.tls, self.quick = target, timeout, tls, quick
        self.steps: list[Step] = []
        self.rng = random.Random(4242)
        self.answered: set[bytes] = set()  # records echoed already: a late copy is not wrong
        self.late = 0

    async def _step(self, name: str, fn: Any) -> Step:
        started = time.perf_counter()
        try:
            status, detail = await fn()
        except (DtlsFailed, Unreachable) as exc:
            status, detail = FAIL, str(exc)
        except OSError as exc:
            status, detail = FAIL, f"{type(exc).__name__}: {exc.strerror or exc}"
        step = Step(name, status, detail, time.perf_counter() - started, {})
        self.steps.append(step)
        return step

    async def run(self) -> list[Step]:
        holder: list[DtlsClient] = []
        step = await self._step("handshake", lambda: self._handshake(holder))
        if not holder:  # nothing to measure: the exit table's 2
            raise Unreachable(f"{self.target.url}: {step.detail}")
        client = holder[0]
        try:
            if self.quick:
                await self._step("one record", lambda: self._records(client, [b"quick"]))
                return self.steps
            await self._step(
                "net-tools payloads", lambda: self._records(client, list(NET_TOOLS_PAYLOADS))
            )
            await self._step("1200-byte record", lambda: self._records(client, [TEXT[:1200]]))
            await self._step("Zephyr client pattern", lambda: self._zephyr(client))
        finally:
            client.close()
        await self._step("handshake under loss", self._lossy)
        if self.late:
            self.steps.append(
                Step(
                    "late or repeated echoes",
                    FINDING,
                    f"{self.late} echo(es) of earlier records came late or twice "
                    "(loss, duplication or reordering on the path)",
                )
            )
        return self.steps

    async def _handshake(self, holder: list[DtlsClient]) -> tuple[str, str]:
        client = await open_dtls(self.target, self.tls, self.timeout)
        holder.append(client)
        if client.hello_verify:
            return PASS, f"DTLS 1.2, {client.suite}, cookie exchange (HelloVerifyRequest)"
        return FINDING, (
            f"DTLS 1.2, {client.suite}, but no cookie exchange: the server answers an "
            "unverified source with its whole first flight (an amplifier for spoofed sources)"
        )

    async def _echo(self, client: DtlsClient, record: bytes) -> None:
        for _ in range(TRIES):
            client.send(record)
            while (echo := await client.recv(READ_TIMEOUT)) is not None:
                if echo == record:
                    self.answered.add(record)
                    return
                if echo not in self.answered:
                    raise DtlsFailed(
                        f"a {len(record)}-byte record came back as {len(echo)} different bytes"
                    )
                self.late += 1  # a late or repeated echo of an earlier record
        raise DtlsFailed(f"no echo of a {len(record)}-byte record after {TRIES} tries")

    async def _records(self, client: DtlsClient, records: list[bytes]) -> tuple[str, str]:
        for record in records:
            await self._echo(client, record)
        sizes = ", ".join(str(len(r)) for r in records)
        return PASS, f"{len(records)} record(s) of {sizes} B, each echoed as one record"

    async def _zephyr(self, client: DtlsClient) -> tuple[str, str]:
        for _ in range(10):
            await self._echo(client, TEXT[: self.rng.randint(1, ZEPHYR_MAX)])
        return PASS, "10 records of 1-1159 B, each echo awaited"

    async def _lossy(self) -> tuple[str, str]:
        def lose(direction: str, index: int) -> bool:
            return index == 1

        started = time.perf_counter()
        client = await open_dtls(self.target, self.tls, max(self.timeout, 8.0), lose)
        try:
            await self._echo(client, b"after loss")
        finally:
            client.close()
        return PASS, (
            f"{client.lost} datagram(s) lost on purpose, {client.retransmissions} "
            f"retransmission(s) of ours, done in {time.perf_counter() - started:.1f} s"
        )


def run(target: Target, timeout: float, tls: TlsOptions | None, quick: bool = False) -> list[Step]:
    return asyncio.run(DtlsProbe(target, timeout, tls, quick).run())
