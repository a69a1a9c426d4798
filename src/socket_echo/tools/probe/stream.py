"""``socket-echo probe``: a conformance check of any echo server (ours, a board, xinetd, socat).

Each step has a timeout; results are ``pass``, ``fail``, or ``finding`` (a fact worth knowing
that is not a conformance failure, such as "serves one client at a time").
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from socket_echo.payloads import NET_TOOLS_PAYLOADS
from socket_echo.tools.connect import tcp_info
from socket_echo.tools.connect.duplex import (
    CLOSED,
    RESET,
    SILENT,
    WRONG,
    DuplexError,
    duplex,
)
from socket_echo.tools.connect.ending import end_gracefully
from socket_echo.tools.connect.target import (
    ICMP_REFUSED,
    Target,
    TlsOptions,
    Unreachable,
    connect,
    connect_many,
    is_loopback,
)
from socket_echo.tools.defaults import DEFAULT_DRAIN_TIMEOUT
from socket_echo.tools.probe.steps import FAIL, FINDING, PASS, SKIP, Step

CONCURRENT_CLIENTS = 20
LATENCY_ROUNDS = 200
NAGLE_THRESHOLD_MS = 10.0
UDP_MAX = 1280
UDP_LIMIT_V4, UDP_LIMIT_V6 = 65507, 65527  # the largest UDP payload over IPv4 and IPv6
UDP_TRIES = 3  # the first send and two retries
REFUSAL = b"Too many connections"
LATER_STEPS = (
    "half-close",
    f"{CONCURRENT_CLIENTS} clients at once",
    f"latency: {LATENCY_ROUNDS} x 64 B",
    "1 KiB round trip (Nagle)",
)


Outcome = tuple[str, str] | tuple[str, str, dict[str, Any]]


class StepFailed(Exception):
    """A step failed; ``received`` bytes came back before, ``how`` (duplex's SILENT, CLOSED,
    RESET, WRONG) says what the peer did."""

    def __init__(self, message: str, received: int = -1, how: str = WRONG) -> None:
        super().__init__(message)
        self.received = received
        self.how = how


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(min(1 << 20, n - len(buf)))
        except TimeoutError:
            raise StepFailed(f"no answer in time: got {len(buf)} of {n} bytes") from None
        except ConnectionError as exc:
            raise StepFailed(f"connection lost after {len(buf)} of {n} bytes: {exc}") from None
        if not part:
            raise StepFailed(f"server closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def round_trip(
    sock: socket.socket,
    data: bytes,
    timeout: float,
    watch: Callable[[socket.socket], object] | None = None,
) -> bytes:
    """Send while receiving (one thread: safe for TLS), so large payloads cannot deadlock."""
    got = bytearray()
    try:
        duplex(sock, data, got.extend, timeout, half_close=False, watch=watch)
    except DuplexError as exc:
        raise StepFailed(str(exc), exc.received, exc.how) from None
    finally:
        sock.settimeout(timeout)
    return bytes(got)


def first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"byte {i} is 0x{y:02x}, sent 0x{x:02x}"
    return f"length {len(b)}, sent {len(a)}"


class Probe:
    def __init__(
        self,
        target: Target,
        timeout: float = 5.0,
        tls: TlsOptions | None = None,
        require_concurrency: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self.require_concurrency = require_concurrency
        self.steps: list[Step] = []
        self._udp_sent: set[bytes] = set()  # payloads already sent: to tell stale answers
        self._udp_refused = False  # an ICMP port unreachable came back
        self.resets_sent = 0  # connections the peer did not close within the drain timeout
        self.last_failure: StepFailed | None = None
        self._peer: tuple[dict[str, int], list[str]] = ({}, [])
        self.zero_windows, self._window_open = 0, True  # the peer's window, as sent to

    def connect(self) -> socket.socket:
        return connect(self.target, self.timeout, self.tls)

    @contextlib.contextmanager
    def connection(self) -> Iterator[socket.socket]:
        """A connection for one step, ended gracefully whatever the step found."""
        sock = self.connect()
        try:
            yield sock
        finally:
            self.end(sock)

    def end(self, *socks: socket.socket) -> None:
        """FIN, what is owed read until the peer closes, then close: never a reset the
        peer did not ask for (connect/ending.py; a reset wedges a firmware loop)."""
        ending = end_gracefully(socks, min(self.timeout, DEFAULT_DRAIN_TIMEOUT))
        self.resets_sent += ending.resets

    def step(self, name: str, fn: Callable[[], Outcome]) -> Step:
        started = time.perf_counter()
        try:
            result = fn()
            status, detail = result[0], result[1]
            data = result[2] if len(result) > 2 else {}
        except StepFailed as exc:
            status, detail, data = FAIL, str(exc), {}
            self.last_failure = exc
        except Unreachable as exc:
            status, detail, data = FAIL, str(exc), {}
        except OSError as exc:
            status, detail, data = FAIL, f"{type(exc).__name__}: {exc.strerror or exc}", {}
        step = Step(name, status, detail, time.perf_counter() - started, data)
        self.steps.append(step)
        return step

    # -- TCP, TLS, Unix -------------------------------------------------------------------
    def run_stream(self) -> list[Step]:
        self._sock = self.connect()  # Unreachable propagates: exit 2
        try:
            payloads = [(f"net-tools: {name}", p) for name, p in NET_TOOLS_PAYLOADS]
            payloads += [
                ("single write 16 KiB", os.urandom(16 << 10)),
                ("1 MiB random", os.urandom(1 << 20)),
            ]
            for i, (name, payload) in enumerate(payloads):
                self.last_failure = None
                step = self.step(name, functools.partial(self._compare_current, payload))
                if step.status == FAIL and i == 0 and (verdict := self._nothing_back()):
                    # a mute or wedged peer: what follows cannot pass; said now, not in 80 s
                    self.steps.append(Step("verdict", FAIL, verdict, 0.0))
                    for rest, _ in payloads[1:]:
                        self.steps.append(Step(rest, SKIP, "skipped: " + verdict, 0.0))
                    for rest in LATER_STEPS:
                        self.steps.append(Step(rest, SKIP, "skipped: " + verdict, 0.0))
                    return self.steps
                if step.status == FAIL:  # the stream is out of step now: start afresh
                    self.end(self._sock)
                    self._sock = self.connect()
            self._peer = tcp_info.read(self._sock)  # after 1 MiB: what the kernel saw
        finally:
            self.end(self._sock)
        half_close, concurrency, latency, nagle = LATER_STEPS
        self.step(half_close, self._half_close)
        self.step(concurrency, self._concurrency)
        self.step(latency, self._latency)
        self.step(nagle, self._nagle)
        if self._peer[0]:
            self.step("peer (TCP_INFO)", self._peer_step)
        if self.resets_sent:
            self.steps.append(
                Step(
                    "ending",
                    FINDING,
                    f"{self.resets_sent} connection(s) had to be reset: the peer did not close "
                    "after probe's FIN and what it owed (a peer should close on EOF)",
                    0.0,
                )
            )
        return self.steps

    def _watch_window(self, sock: socket.socket) -> None:
        """Counts the peer's zero windows seen while the payloads go (TCP_INFO's snd_wnd,
        Linux 5.4 and later: a board whose application reads slower than it is sent to)."""
        info, _ = tcp_info.read(sock)
        window = info.get("snd_wnd")
        if window is None:
            return
        if window == 0 and self._window_open:
            self.zero_windows += 1
        self._window_open = window > 0

    def _peer_step(self) -> tuple[str, str, dict[str, Any]]:
        """What the kernel saw of the peer's stack on the payload connection, beside the
        application's round trip: a finding when it lacks SACK or timestamps or had to
        retransmit (what a capture would have shown)."""
        line, data = tcp_info.describe(*self._peer)
        latency = next((s for s in self.steps if s.name.startswith("latency")), None)
        if latency is not None and "p50_us" in latency.data:
            line += f" (the application's p50 {latency.data['p50_us'] / 1000:.2f} ms)"
            data["application_rtt_p50_us"] = latency.data["p50_us"]
        if "snd_wnd" in self._peer[0]:
            data["zero_windows_seen"] = self.zero_windows
            line += f"; {self.zero_windows} zero window(s) seen while sending"
        lacking = [k for k in ("sack", "timestamps") if not data.get(k)]
        if lacking or data.get("retransmitted_segments") or self.zero_windows:
            return FINDING, line, data
        return PASS, line, data

    def _nothing_back(self) -> str | None:
        """The first payload got not one byte back: what the peer does, in words (None when
        something came back, or it was another failure)."""
        failure = self.last_failure
        if failure is None or failure.received != 0:
            return None
        if failure.how == SILENT:
            return (
                "connects, but no byte ever came back: the stack accepts, the application "
                "does not answer (a wedged firmware loop, or one serving another client)"
            )
        if failure.how == CLOSED:
            return "accepts, then closes without echoing a byte"
        if failure.how == RESET:
            return "accepts, then resets without echoing a byte"
        return None

    def _compare_current(self, payload: bytes) -> tuple[str, str]:
        return self._compare(self._sock, payload)

    def _compare(self, sock: socket.socket, payload: bytes) -> tuple[str, str]:
        got = round_trip(sock, payload, self.timeout, self._watch_window)

        if got != payload:
            return FAIL, f"echo differs: {first_difference(payload, got)}"
        return PASS, f"{len(payload)} B"

    def _half_close(self) -> tuple[str, str]:
        if self.target.scheme == "tls":
            return SKIP, "Python's ssl cannot half-close TLS and keep reading (see duplex.py)"
        data = os.urandom(64 << 10)
        got = bytearray()
        with self.connection() as sock:
            try:
                duplex(sock, data, got.extend, self.timeout, half_close=True)
            except DuplexError as exc:
                return FAIL, f"after half-close: {exc}"
            sock.settimeout(self.timeout)
            try:
                extra = sock.recv(1 << 16)
            except TimeoutError:
                return FAIL, f"all {len(data)} bytes came back, but no EOF within the timeout"
            except OSError as exc:
                return FAIL, f"error instead of EOF: {exc}"
        if bytes(got) != data:
            return FAIL, f"after half-close: {first_difference(data, bytes(got))}"
        if extra:
            return FAIL, f"{len(extra)} bytes more than were sent came back"
        return PASS, f"{len(data)} B back, then EOF"

    def _concurrency(self) -> tuple[str, str, dict[str, Any]]:
        socks, not_connected = connect_many(
            self.target, CONCURRENT_CLIENTS, min(self.timeout, 2.0), self.tls
        )
        try:
            if not socks:
                return FAIL, "no connection got through", {}
            messages = {s: f"client {i:02d} says hello".encode() for i, s in enumerate(socks)}
            for s, msg in messages.items():
                s.sendall(msg)
            answered, refused, wrong = self._collect(messages, min(self.timeout, 2.0))
            if wrong:
                return FAIL, f"{len(wrong)} client(s) got another's bytes or garbage", {}
            if not_connected and len(answered) == len(socks):
                at_once = len(answered)
                how = (
                    f"serves {at_once} clients at once; {not_connected} of "
                    f"{CONCURRENT_CLIENTS} could not connect (backlog full)"
                )
                return (FAIL if self.require_concurrency else FINDING), how, {"at_once": at_once}
            at_once = len(answered)
            backlog = (
                (f"; {not_connected} of {CONCURRENT_CLIENTS} could not even connect (backlog full)")
                if not_connected
                else ""
            )
            if at_once == CONCURRENT_CLIENTS:
                return PASS, f"{at_once} of {at_once} answered at once", {"at_once": at_once}
            if at_once == 0:
                return FAIL, "no client was answered", {"at_once": 0}
            # Does the server get to the others once the first ones leave? (the seed does)
            for s in answered:
                self.end(s)
                del messages[s]
            # Each one answered now leaves at once, so a one-at-a-time server moves on.
            later, refused_later, wrong_later = self._collect(
                messages, self.timeout, leave_when_answered=True
            )
            if wrong_later:
                return FAIL, "a waiting client got wrong bytes", {}
            limit = "one client" if at_once == 1 else f"{at_once} clients"
            how = f"serves {limit} at a time{backlog}"
            if refused or refused_later:
                how += " (answers 'Too many connections' to the others)"
            elif not later:
                return FAIL, f"{how}; the others were never answered", {"at_once": at_once}
            status = FAIL if self.require_concurrency else FINDING
            return status, how, {"at_once": at_once}
        finally:
            self.end(*socks)

    def _collect(
        self, messages: dict[socket.socket, bytes], wait: float, leave_when_answered: bool = False
    ) -> tuple[list[socket.socket], list[socket.socket], list[socket.socket]]:
        """Wait up to ``wait`` seconds for echoes; (answered, refused, wrong). With
        ``leave_when_answered`` each client closes as soon as its echo is complete."""
        answered: list[socket.socket] = []
        refused: list[socket.socket] = []
        wrong: list[socket.socket] = []
        got = {s: b"" for s in messages}
        sel = selectors.DefaultSelector()
        for s in messages:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + wait
        pending = set(messages)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = cast(socket.socket, key.fileobj)
                try:
                    part = s.recv(4096)
                except OSError:
                    part = b""
                got[s] += part
                want = messages[s]
                done = not part or len(got[s]) >= len(want)
                if not done:
                    continue
                sel.unregister(s)
                pending.discard(s)
                if got[s] == want:
                    answered.append(s)
                    if leave_when_answered:
                        self.end(s)
                elif got[s].startswith(REFUSAL) or not got[s]:
                    refused.append(s)
                else:
                    wrong.append(s)
        sel.close()
        return answered, refused, wrong

    def _latency(self) -> tuple[str, str, dict[str, Any]]:
        samples = self._round_trips(64, LATENCY_ROUNDS)
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        return PASS, f"p50 {p50:.0f} µs, p99 {p99:.0f} µs", {"p50_us": p50, "p99_us": p99}

    def _nagle(self) -> tuple[str, str, dict[str, Any]]:
        ms = statistics.median(self._round_trips(1024, 7)) / 1000
        data = {"round_trip_ms": ms}
        if ms > NAGLE_THRESHOLD_MS:
            return (
                FINDING,
                (
                    f"{ms:.1f} ms per 1 KiB round trip: small sends meet Nagle and "
                    "delayed ACKs (set TCP_NODELAY, send in one piece)"
                ),
                data,
            )
        return PASS, f"{ms:.2f} ms", data

    def _round_trips(self, size: int, rounds: int) -> list[float]:
        samples = []
        with self.connection() as sock:
            # Warm-up, not counted, with room to spare: a one-at-a-time server may still be
            # working through the connections of the concurrency step.
            if round_trip(sock, b"warm-up", 3 * self.timeout) != b"warm-up":
                raise StepFailed("warm-up round trip: echo differs")
            for i in range(rounds):
                msg = bytes((i + j) % 256 for j in range(size))
                started = time.perf_counter()
                sock.sendall(msg)
                if recv_exactly(sock, size) != msg:
                    raise StepFailed(f"round trip {i}: echo differs")
                samples.append((time.perf_counter() - started) * 1e6)
        return samples

    # -- UDP ------------------------------------------------------------------------------
    def run_udp(self) -> list[Step]:
        sock = connect(self.target, self.timeout / UDP_TRIES)
        try:
            payloads = [(n, p) for n, p in NET_TOOLS_PAYLOADS if len(p) <= UDP_MAX]
            payloads += [(f"datagram {UDP_MAX} B", os.urandom(UDP_MAX)), ("empty datagram", b"")]
            answered = 0
            for name, payload in payloads:
                step = self.step(f"udp: {name}", functools.partial(self._datagram, sock, payload))
                answered += step.status in (PASS, FINDING)
            if answered == 0:
                raise Unreachable(
                    f"{self.target.url}: "
                    + (
                        ICMP_REFUSED
                        if self._udp_refused
                        else "no datagram was answered (silence: nothing to tell a dead host, a "
                        "firewall and a rate limit apart)"
                    )
                )
            self.step("udp: largest datagram", functools.partial(self._largest, sock))
        finally:
            sock.close()
        return self.steps

    def _echoes(self, sock: socket.socket, size: int, wait: float) -> bool:
        """Whether a datagram of ``size`` bytes comes back whole (two tries)."""
        payload = os.urandom(size)
        for _ in range(2):
            try:
                sock.send(payload)
            except OSError:  # too large for this socket or path
                return False
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    if sock.recv(65535) == payload:
                        return True
                except (TimeoutError, OSError):
                    break
        return False

    def _largest(self, sock: socket.socket) -> tuple[str, str, dict[str, Any]]:
        """The largest datagram the peer echoes (a binary search up to UDP's limit over this
        family), the path MTU the kernel knows, and whether IPv4 fragments come back
        reassembled (Zephyr builds without CONFIG_NET_IPV4_FRAGMENT and small lwIP builds do
        not reassemble: their UDP echo stops at the MTU)."""
        v6 = sock.family == socket.AF_INET6
        limit = UDP_LIMIT_V6 if v6 else UDP_LIMIT_V4
        mtu = path_mtu(sock)
        wait = min(1.0, self.timeout / UDP_TRIES)
        low, high = UDP_MAX if self._echoes(sock, UDP_MAX, wait) else 0, limit
        if low and self._echoes(sock, limit, wait):
            low = limit
        while high - low > 1 and low < limit:
            mid = (low + high) // 2
            if self._echoes(sock, mid, wait):
                low = mid
            else:
                high = mid
        header = 48 if v6 else 28
        data: dict[str, Any] = {"largest_echoed": low, "path_mtu": mtu, "limit": limit}
        if not low:
            return FAIL, f"no datagram of {UDP_MAX} B came back", data
        unfragmented = mtu - header if mtu else None
        fragments = None if unfragmented is None or v6 else low > unfragmented
        data["fragments_reassembled"] = fragments
        line = f"{low:,} B echoed (of {limit:,} this family allows)"
        if mtu:
            line += f"; path MTU {mtu:,} B"
        if fragments is not None and unfragmented is not None and unfragmented < limit:
            line += (
                "; IPv4 fragments come back reassembled"
                if fragments
                else f"; nothing over {unfragmented:,} B (one frame): the peer does not "
                "reassemble IPv4 fragments"
            )
        return (PASS if low == limit else FINDING), line, data

    def _loss_hint(self) -> str:
        """Why a datagram may go unanswered by a server on this machine."""

        if not is_loopback(self.target):
            return " (lost on the path, or refused by the server: its counters tell which)"
        return (
            " (the target is on this machine: a socket-echo server drops datagrams over its "
            "--udp-rate/--udp-burst per-source limit, or from a source port below 1024)"
        )

    def _datagram(self, sock: socket.socket, payload: bytes) -> tuple[str, str]:
        """One datagram, answered within its tries. Answers to earlier datagrams (a path
        that duplicates or delays) are set aside and reported, not taken for this one."""
        stale = 0
        try:
            for attempt in range(UDP_TRIES):
                sock.send(payload)
                deadline = time.monotonic() + self.timeout / UDP_TRIES
                while time.monotonic() < deadline:
                    try:
                        reply = sock.recv(65535)
                    except TimeoutError:
                        break
                    except ConnectionRefusedError:
                        self._udp_refused = True
                        raise StepFailed(ICMP_REFUSED) from None
                    if reply == payload:
                        retried = (
                            f", after {attempt} retr{'y' if attempt == 1 else 'ies'}"
                            if attempt
                            else ""
                        )
                        if stale:
                            return FINDING, (
                                f"{len(payload)} B{retried}; {stale} late or duplicate "
                                "answer(s) to earlier datagrams came first"
                            )
                        return PASS, f"{len(payload)} B{retried}"
                    if reply in self._udp_sent:
                        stale += 1
                        continue
                    if len(reply) != len(payload) or attempt == UDP_TRIES - 1:
                        return FAIL, f"reply differs: {first_difference(payload, reply)}"
            return FAIL, f"no reply after {UDP_TRIES} tries{self._loss_hint()}"
        finally:
            self._udp_sent.add(payload)

    def quick(self) -> bool:
        """One short round trip: fit for a container health check. Unreachable when
        nothing answers (exit 2, as for a full probe); False when the echo is wrong."""
        try:
            if self.target.scheme == "udp":
                with connect(self.target, self.timeout) as sock:
                    try:
                        status, detail = self._datagram(sock, b"socket-echo health")
                    except StepFailed as exc:  # refused: nothing listens (exit 2)
                        raise Unreachable(f"{self.target.url}: {exc}") from None
                    if detail.startswith("no reply"):  # as a full probe: nothing answered
                        raise Unreachable(f"{self.target.url}: {detail}")
                    return status == PASS
            with self.connection() as sock:
                return round_trip(sock, b"socket-echo health", self.timeout) == (
                    b"socket-echo health"
                )
        except Unreachable:
            raise
        except (OSError, StepFailed):
            return False


def path_mtu(sock: socket.socket) -> int | None:
    """The path MTU the kernel knows for a connected socket (IP_MTU, Linux), None elsewhere."""
    level, option = (
        (socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU", 24))
        if sock.family == socket.AF_INET6
        else (socket.IPPROTO_IP, getattr(socket, "IP_MTU", 14))
    )
    try:
        return int(sock.getsockopt(level, option))
    except OSError:
        return None


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def run(
    target: Target, timeout: float, tls: TlsOptions | None, require_concurrency: bool
) -> list[Step]:
    probe = Probe(target, timeout, tls, require_concurrency)
    return probe.run_udp() if target.scheme == "udp" else probe.run_stream()
