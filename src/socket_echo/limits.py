"""Connection accounting: the connection limit and the periodic idle/stall sweep.

Timeouts are one periodic sweep over per-connection activity counters, never a timer per
message: the data path only adds integers, and the sweep notices which counters moved.

The open connections are one count per process (``OpenCount``; the native extension's
``Count`` where it is built, so the native engine's thread admits against the same atomic
number as the Python paths). The native engine admits, sweeps and closes its connections
itself (``engine_owned``); the table then only aggregates what it is told, and pulls
(``Unlisted``) when it must see every connection. Nothing here calls back into an engine.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from socket_echo.config import METRICS_MAX_CONNECTIONS
from socket_echo.logs import RateLimitedLog


class Tracked(Protocol):
    """What the table, its sweep, the drain and the metrics need of a connection
    (lifecycle.py's Connection). ``engine_owned``: its path took its slot in the count, gives
    it back, and sweeps it (tcp/native.py); the table lists and counts it, nothing more."""

    engine_owned: bool
    seen_activity: int
    active_since: float
    bytes_in: int

    @property
    def listener(self) -> str: ...
    def activity(self) -> int: ...
    def received(self) -> int: ...
    def held(self) -> int: ...
    def idle_expired(self) -> None: ...
    def close(self, reason: str) -> None: ...
    def abort(self, reason: str) -> None: ...


def sweep_interval(idle_timeout: float) -> float:
    """How often to look: often enough that a timeout fires within ~1/8 of its length,
    at most once a second (cheap for 10k connections), at least every 50 ms."""
    return max(0.05, min(1.0, idle_timeout / 8))


DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 3600.0)  # seconds
FD_RESERVE = 16  # descriptors kept free for listeners, logs, accept() itself


def raise_descriptor_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE toward the hard one (as nginx's worker_rlimit_nofile does);
    returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def descriptor_budget(max_connections: int, metrics: bool = False) -> int:
    """How many connections the descriptor limit leaves room for; with ``metrics``, less the
    metrics endpoint's connections (METRICS_MAX_CONNECTIONS), so a scrape or a liveness
    probe always finds a descriptor."""
    limit = raise_descriptor_limit(max_connections + 256)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    reserve = FD_RESERVE + (METRICS_MAX_CONNECTIONS if metrics else 0)
    return max(1, limit - in_use - reserve)


ADMITTED, OVER_CAP, OVER_BUDGET = 0, 1, 2  # OpenCount.take (engine.h's SE_*)


class Count(Protocol):
    def take(self, max_connections: int, fd_budget: int, /) -> int: ...
    def give(self) -> None: ...
    def value(self) -> int: ...


class OpenCount:
    """The pure-Python twin of the native ``Count`` (engine.h's se_count_take, the one rule):
    a slot for one more connection unless the cap is reached, then unless the descriptors
    (one per connection plus ``extra``) reach the budget. Only the event loop's thread uses
    it, so a plain integer is atomic enough."""

    __slots__ = ("extra", "open")

    def __init__(self) -> None:
        self.open = 0
        self.extra = 0  # descriptors beyond one per connection (the native engine's pipes)

    def take(self, max_connections: int, fd_budget: int, /) -> int:
        n = self.open
        if n >= max_connections:
            return OVER_CAP
        if n + self.extra >= fd_budget:
            return OVER_BUDGET
        self.open = n + 1
        return ADMITTED

    def give(self) -> None:
        self.open -= 1

    def value(self) -> int:
        return self.open


def open_count() -> Count:
    """The process's count: the native one where the extension may run (the native engine
    requires it), else the twin."""
    from socket_echo import extensions

    if not extensions.disabled():
        try:
            from socket_echo.tcp import _native  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            pass
        else:
            count: Count = _native.Count()
            return count
    return OpenCount()


class Unlisted(Protocol):
    """A data path that admits connections itself and makes their objects only when asked
    (tcp/native.py): the table pulls from it when it must see every open connection (the
    drain lists them; a scrape sums them)."""

    def list_unlisted(self) -> None: ...
    def unlisted_by_listener(self) -> dict[str, tuple[int, int, int]]: ...


class ListenerCounters:
    __slots__ = ("bytes_in", "bytes_out", "closed", "opened")

    def __init__(self) -> None:
        self.opened = 0
        self.closed: Counter[str] = Counter()  # by reason
        self.bytes_in = 0
        self.bytes_out = 0


class ConnectionTable:
    """The open connections, the limits on their number, and the counters about them.

    Two limits: ``--max-connections``, and the descriptor budget. Refusing connections over
    the budget ourselves keeps accept() from ever meeting EMFILE in the usual case, on either
    loop; uvloop would otherwise close the surplus silently (libuv's EMFILE trick).
    """

    def __init__(
        self,
        max_connections: int,
        idle_timeout: float,
        fd_budget: int | None = None,
        count: Count | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.fd_budget = max_connections if fd_budget is None else fd_budget
        self.idle_timeout = idle_timeout
        self.slots = open_count() if count is None else count
        self.open: set[Tracked] = set()
        self.opened = 0  # also the id of the newest connection
        # Counted once per connection, never per message; totals are summed when asked.
        self.by_listener: dict[str, ListenerCounters] = {}
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)  # histogram counts
        self.duration_sum = 0.0
        self.rejected = RateLimitedLog(
            "connection_rejected",
            f"connection limit ({max_connections}) reached: closed {{count}} new connection(s)",
        )
        self.out_of_descriptors = RateLimitedLog(
            "descriptors_exhausted",
            f"out of file descriptors (room for {self.fd_budget} connections; raise ulimit -n): "
            "closed {count} new connection(s)",
        )
        self.on_close: list[Callable[[], None]] = []
        self.unlisted: list[Unlisted] = []  # paths whose connections may have no object yet
        self._sweeper: asyncio.TimerHandle | None = None

    def count(self) -> int:
        """Open connections, listed or not, every path's."""
        return self.slots.value()

    def unlisted_by_listener(self) -> dict[str, tuple[int, int, int]]:
        """(connections, bytes in, bytes out) of the open connections that have no object, by
        listener, from the paths that own them (a scrape: listing them would end a native
        path's unlisted mode for all of them)."""
        sums: dict[str, tuple[int, int, int]] = {}
        for source in self.unlisted:
            for listener, (n, got, sent) in source.unlisted_by_listener().items():
                n0, got0, sent0 = sums.get(listener, (0, 0, 0))
                sums[listener] = (n0 + n, got0 + got, sent0 + sent)
        return sums

    def list_all(self) -> None:
        """Make every open connection an object in ``open`` (before looking at all of them)."""
        for source in self.unlisted:
            source.list_unlisted()

    def admit(self, conn: Tracked, now: float, listener: str = "", force: bool = False) -> bool:
        """Count a connection in, or refuse it over a limit. ``force``: it was admitted
        already, by a path that admits itself (``engine_owned``), and is only listed now."""
        if not force:
            why = self.slots.take(self.max_connections, self.fd_budget)
            if why != ADMITTED:
                (self.rejected if why == OVER_CAP else self.out_of_descriptors).note()
                return False
        conn.active_since = now
        self.open.add(conn)
        self.opened += 1
        counters = self.by_listener.get(listener)
        if counters is None:
            counters = self.by_listener[listener] = ListenerCounters()
        counters.opened += 1
        return True

    def release(
        self,
        conn: Tracked,
        reason: str,
        bytes_in: int,
        bytes_out: int,
        listener: str = "",
        duration: float = 0.0,
    ) -> None:
        self.open.discard(conn)
        if not conn.engine_owned:
            self.slots.give()
        self._count_close(self.by_listener[listener], reason, bytes_in, bytes_out, duration)

    def count_gone(
        self,
        listener: str,
        count: int,
        reasons: dict[str, int],
        bytes_in: int,
        bytes_out: int,
        durations: Sequence[int],
        duration_sum: float,
    ) -> None:
        """Connections that opened and closed without ever being listed, summed by the path
        that admitted them (per wake-up): counted in and out at once, as admit() and
        release() would have counted each. ``durations``: counts per DURATION_BUCKETS."""
        self.opened += count
        counters = self.by_listener.get(listener)
        if counters is None:
            counters = self.by_listener[listener] = ListenerCounters()
        counters.opened += count
        for reason, n in reasons.items():
            if n:
                counters.closed[reason] += n
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out
        for i, n in enumerate(durations):
            self.durations[i] += n
        self.duration_sum += duration_sum
        self._freed()

    def _count_close(
        self,
        counters: ListenerCounters,
        reason: str,
        bytes_in: int,
        bytes_out: int,
        duration: float,
    ) -> None:
        counters.closed[reason] += 1
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out
        self.durations[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration
        self._freed()

    def _freed(self) -> None:
        if self.on_close:
            for callback in self.on_close:
                callback()

    @property
    def closed(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counters in self.by_listener.values():
            total.update(counters.closed)
        return total

    @property
    def bytes_in(self) -> int:
        return sum(c.bytes_in for c in self.by_listener.values())

    @property
    def bytes_out(self) -> int:
        return sum(c.bytes_out for c in self.by_listener.values())

    def start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.idle_timeout > 0:
            interval = sweep_interval(self.idle_timeout)
            self._sweeper = loop.call_later(interval, self._sweep, loop, interval)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.sweep(loop.time())
        self._sweeper = loop.call_later(interval, self._sweep, loop, interval)

    def sweep(self, now: float) -> None:
        """One look at every open connection of the Python paths: those whose activity
        counter has not moved for ``idle_timeout`` are told so (they close, or abort if their
        echo is stuck). The native engine sweeps its own (engine.c's sweep, this rule's
        twin). An idle timeout of 0 means never (and no sweep is scheduled for it at all)."""
        expired = []
        for conn in self.open:
            if conn.engine_owned:
                continue
            seen = conn.activity()
            if seen != conn.seen_activity:
                conn.seen_activity = seen
                conn.active_since = now
            elif self.idle_timeout > 0 and now - conn.active_since >= self.idle_timeout:
                expired.append(conn)
        for conn in expired:
            conn.active_since = now  # one closing gets another timeout to finish, then a reset
            conn.idle_expired()
        for log in (self.rejected, self.out_of_descriptors):
            if log.pending:
                log.note(0)
