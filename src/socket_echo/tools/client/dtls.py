"""``socket-echo client dtls://``: records from stdin, their echoes on stdout."""

from __future__ import annotations

import asyncio
import os
import sys

from socket_echo.tools.connect.dtls import DtlsFailed, open_dtls
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable

RECORD_CHUNK = 1024  # bytes per record from a pipe: a record fits any path's MTU in one datagram
TRIES = 3


async def pipe(target: Target, tls: TlsOptions | None, timeout: float) -> int:
    """``client dtls://``: each line typed (a terminal) or each 1 KiB of stdin (a pipe) goes
    out as one record, and its echo comes out on stdout before the next is sent; a record with
    no echo is sent again (UDP loses datagrams), up to 3 times. Exit 0 once stdin ended and
    every record came back, 1 otherwise (one line)."""
    loop = asyncio.get_running_loop()
    try:
        client = await open_dtls(target, tls, timeout)
    except DtlsFailed as exc:  # no session: nothing answered as a DTLS echo should
        raise Unreachable(f"{target.url}: {exc}") from None
    tty = sys.stdin.isatty()
    fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    try:
        while True:
            if tty:
                chunk = (await loop.run_in_executor(None, sys.stdin.readline)).encode()
            else:
                chunk = await loop.run_in_executor(None, os.read, fd, RECORD_CHUNK)
            if not chunk:
                return 0
            for _ in range(TRIES):
                client.send(chunk)
                echo = await client.recv(timeout / TRIES)
                if echo is not None:
                    break
            else:
                raise DtlsFailed(f"no echo of a {len(chunk)}-byte record after {TRIES} tries")
            if echo != chunk:
                raise DtlsFailed(f"the echo of a {len(chunk)}-byte record differs")
            out.write(echo)
            out.flush()
    finally:
        client.close()


def run(target: Target, tls: TlsOptions | None, timeout: float) -> int:
    """``client dtls://``; DtlsFailed (the echo) or Unreachable (the handshake) carry the one
    line to show."""
    return asyncio.run(pipe(target, tls, timeout))
