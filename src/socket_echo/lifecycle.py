"""One connection lifecycle for every kind: admit, activity, close, release.

A data path moves bytes (tcp/native.py, tcp/epoll.py, tcp/protocol.py and the impaired echo
for streams; QUIC connections and DTLS sessions in servers/); everything else a connection
goes through is here, written once:

- **admit**: refused while draining, over ``--max-connections`` or over the descriptor budget
  (limits.ConnectionTable); an admitted connection gets its number and an open log record;
- **activity**: the data path adds to ``bytes_in`` and ``drains`` (plain integer adds); the
  table's sweep compares :func:`activity` (bytes in, bytes the peer took, drains) with what
  it saw last time, so no timer runs per message, and a slow reader is not a stalled one;
- **close** (deliver what is owed, then FIN) and **abort** (RST now), with a reason from
  :data:`REASONS`, asked for by the sweep, the drain or the data path itself;
- **release**: once the socket is gone the data path calls :meth:`Connection.released` with
  the bytes that never went out; the per-listener counters and the close record follow.

Reasons are constants (the metric label) plus an optional detail for the log line ("error"
with "Broken pipe"), never free text split apart later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from socket_echo.impair.params import Impairments
from socket_echo.limits import ConnectionTable
from socket_echo.logs import log_event

# Why a connection ended: the label of socket_echo_connections_closed_total.
PEER_CLOSED = "peer closed"  # EOF from the peer, everything owed delivered
RESET = "reset by peer"  # ECONNRESET / EPIPE
ERROR = "error"  # another socket error (the detail names it)
IDLE = "idle timeout"  # no traffic for --idle-timeout
STALLED = "write stalled"  # the peer stopped reading its echo for --idle-timeout
SHUTDOWN = "shutdown"  # still open when the graceful timeout ran out
RESET_AFTER = "reset-after"  # an impaired listener reset it on purpose (impair/stream.py)
CLOSE_AFTER = "close-after"  # an impaired listener closed it on purpose
HANDSHAKE_TIMEOUT = "handshake timeout"  # QUIC, DTLS: no finished handshake in time
REASONS = (
    PEER_CLOSED,
    RESET,
    ERROR,
    IDLE,
    STALLED,
    SHUTDOWN,
    RESET_AFTER,
    CLOSE_AFTER,
    HANDSHAKE_TIMEOUT,
)


def lost_reason(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) of a connection lost to ``exc``: the one rule every stream path
    follows (tcp/engine.c's ``lost`` is its C twin), so closed_total{reason} does not
    depend on the scheme or the engine. A peer's reset (ECONNRESET, EPIPE), whatever raised
    it, is RESET; anything else is ERROR with its cause."""
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or getattr(exc, "errno", None) in (
        errno.ECONNRESET,
        errno.EPIPE,
    ):
        return RESET, ""
    return ERROR, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def activity(bytes_in: int, drains: int, held: int, unacked: int) -> int:
    """The one rule for a connection's progress (tcp/engine.c's ``activity`` is its
    C twin): bytes received, plus bytes the peer took (received minus held minus what the
    kernel still has unacknowledged), plus drains. So a reader that takes 10 KB/s is
    progress, and "write stalled" means no progress at all, not too little."""
    return 2 * bytes_in - held - unacked + drains


SIOCOUTQ = 0x5411  # linux/sockios.h (= TIOCOUTQ): bytes not yet acknowledged by the peer


def unacked_on(sock: Any) -> int:
    """SIOCOUTQ of a TCP socket, 0 where it cannot be asked (a Unix socket, not Linux)."""
    try:
        import fcntl  # POSIX only; the Protocol path runs anywhere

        return int.from_bytes(fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"), "little")
    except (ImportError, OSError, ValueError, AttributeError):
        return 0


def format_peer(peer: Any) -> str:
    """A peer address as logs show it: 1.2.3.4:5, [::1]:5, or "local socket" (Unix)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack socket
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) if peer else "local socket"  # a Unix-socket peer has no address


def peer_of(sock: socket.socket) -> Any:
    """The peer of an accepted socket, or None once it is gone (a reset before we asked)."""
    try:
        return sock.getpeername()
    except OSError:
        return None


# SO_LINGER on, 0 s: close() sends RST at once and drops what is unsent (an abort).
LINGER_ABORT = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    """Close with a reset: what a refused connection gets (RST, not an orderly FIN)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    sock.close()


class ListenerContext:
    """What every connection of one listener shares: one pointer per connection. ``make_echo``
    makes the protocol a connection ends on after its gates (the plain echo, or an impaired
    one: server.py chooses per listener)."""

    def __init__(
        self,
        table: ConnectionTable,
        listener: str,
        max_buffer: int,
        access_log: bool,
        loop: asyncio.AbstractEventLoop,
        impair: Impairments | None = None,
        applied: Counter[tuple[str, str]] | None = None,
    ) -> None:
        self.table = table
        self.listener = listener
        self.max_buffer = max_buffer
        self.access_log = access_log
        self.loop = loop
        self.draining = False
        self.impair = impair
        self.applied: Counter[tuple[str, str]] = Counter() if applied is None else applied
        self.make_echo: Callable[[ListenerContext, Any], asyncio.Protocol] | None = None

    def new_echo(self, peer: Any = None) -> asyncio.Protocol:
        """The echo protocol for a connection of this listener (``peer``: the client a PROXY
        header named, else the connection's own)."""
        assert self.make_echo is not None, "server.py sets make_echo for every listener"
        return self.make_echo(self, peer)


class Connection:
    """The data-path-independent half of one connection. Subclasses add the bytes' path and
    implement :meth:`held`, :meth:`close` and :meth:`abort`."""

    __slots__ = (
        "active_since",
        "bytes_in",
        "closing",
        "conn_id",
        "ctx",
        "detail",
        "drains",
        "opened_at",
        "peer",
        "reason",
        "seen_activity",
    )

    engine_owned = False  # the table admits it, gives its slot back and sweeps it

    def __init__(self, ctx: ListenerContext, peer: Any = None) -> None:
        self.ctx = ctx
        self.peer = peer
        self.conn_id = 0  # 0 = not admitted
        self.opened_at = 0.0
        self.bytes_in = 0  # echo bytes received; what went out is bytes_in - held()
        self.drains = 0  # times held bytes drained: a slow reader is active too
        self.seen_activity = 0
        self.active_since = 0.0
        self.closing = False  # close() was asked: nothing more is echoed
        self.reason = ""  # the first reason given wins
        self.detail = ""

    @property
    def listener(self) -> str:
        return self.ctx.listener

    # -- what each data path provides --------------------------------------------------
    def held(self) -> int:
        """Echo bytes received but not yet handed to the kernel."""
        raise NotImplementedError

    def close(self, reason: str) -> None:
        """Read nothing more, deliver what is owed, then FIN and close."""
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """Close at once with a reset; what is held is lost (and counted as not sent)."""
        raise NotImplementedError

    # -- the lifecycle -----------------------------------------------------------------
    def admit(self, now: float | None = None, listed_late: bool = False) -> bool:
        """Count the connection in, or refuse it (the caller then closes the socket).
        ``now``: the loop's time, when the caller has it already (a batch of events), or
        when the connection opened (``listed_late``: a path that admitted it itself lists it
        now, limits and draining notwithstanding; ``engine_owned``)."""
        ctx = self.ctx
        self.opened_at = now = ctx.loop.time() if now is None else now
        if listed_late:
            ctx.table.admit(self, now, ctx.listener, force=True)
        elif ctx.draining or not ctx.table.admit(self, now, ctx.listener):
            return False
        self.conn_id = ctx.table.opened
        if ctx.access_log:
            peer = format_peer(self.peer)
            log_event(
                logging.INFO,
                "connection_open",
                f"connection #{self.conn_id} from {peer}",
                conn=self.conn_id,
                listener=ctx.listener,
                peer=peer,
            )
        return True

    def give_reason(self, reason: str, detail: str = "") -> None:
        """Say why the connection ends; a reason given earlier (idle, shutdown) wins."""
        if not self.reason:
            self.reason, self.detail = reason, detail

    def activity(self) -> int:
        """Progress, by which the sweep judges idle and stalled: bytes in, plus bytes handed
        to the kernel (in minus held), plus drains. A slow reader is progress: each byte it
        takes frees room the echo moves into. Only a peer that neither sends nor reads
        stands still."""
        held = self.held()
        return activity(self.bytes_in, self.drains, held, self.unacked() if held else 0)

    def unacked(self) -> int:
        """Bytes the kernel sent on that the peer has not taken yet (SIOCOUTQ); asked only
        while an echo is held, when the kernel's buffer is full and a slow reader's progress
        shows nowhere else. A path with a socket at hand says so (:func:`unacked_on`)."""
        return 0

    def received(self) -> int:
        """Echo bytes received so far (a data path that counts elsewhere, as the native one
        does in C, says so here; ``bytes_in`` stays a plain attribute, final once released)."""
        return self.bytes_in

    def idle_expired(self) -> None:
        """Called by the sweep: nothing moved for ``--idle-timeout``. A connection that was
        already closing (its FIN sent, or its echo still owed) is reset: the peer neither
        reads nor closes."""
        if self.held() or self.closing:
            self.abort(STALLED)  # the peer stopped reading: its echo cannot drain
        else:
            self.close(IDLE)

    def released(self, unsent: int = 0, now: float | None = None) -> None:
        """The socket is gone: count the connection out and write its close record (once)."""
        conn_id = self.conn_id
        if not conn_id:
            return
        self.conn_id = 0
        ctx = self.ctx
        reason = self.reason or PEER_CLOSED
        bytes_in = self.bytes_in
        bytes_out = bytes_in - unsent
        # never below 0: the opening and the close may be stamped by two clocks (uvloop's
        # cached one, the native engine's): a close line said "-0.000 s"
        duration = max(0.0, (ctx.loop.time() if now is None else now) - self.opened_at)
        ctx.table.release(self, reason, bytes_in, bytes_out, ctx.listener, duration)
        if ctx.access_log:
            peer = format_peer(self.peer)
            shown = f"{reason}: {self.detail}" if self.detail else reason
            log_event(
                logging.INFO,
                "connection_close",
                f"connection #{conn_id} from {peer} closed: {shown}; "
                f"in {self.bytes_in} B, out {bytes_out} B, {duration:.3f} s",
                conn=conn_id,
                listener=ctx.listener,
                peer=peer,
                bytes_in=self.bytes_in,
                bytes_out=bytes_out,
                duration=round(duration, 6),
                reason=shown,
            )
