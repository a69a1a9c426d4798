"""probe of a multicast group (``udp://GROUP:PORT?iface=NAME``): the probe's datagram set sent
once to the group, every member's answers gathered by who sent them, and one step per
responder saying what it got right or wrong; ``--expect-responders N`` fails when fewer
answered. A member answers by unicast from its own address (groups.py), so each answer names
its responder.

Each datagram starts with a tag (a run id and its index), so an answer is matched to what was
sent whatever order and whoever it comes from, and an answer altered in its body is told from
one to another probe's datagram."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from socket_echo.groups import address_key
from socket_echo.tools.connect.target import Target, Unreachable, group_socket
from socket_echo.tools.probe.steps import FAIL, PASS, Step

SETTLE = 0.2  # s: answers are gathered this long after the last datagram's timeout at least
_TAG = 8  # bytes: a 6-byte run id and a 2-byte index


def datagrams(run_id: bytes) -> list[tuple[str, bytes]]:
    """What probe sends a group: the unicast probe's kinds of payload, each tagged."""
    bodies = [
        ("text", b"socket-echo probe: hello, group"),
        ("binary, every byte value", bytes(range(256))),
        ("512 B", bytes((i * 7 + 3) % 256 for i in range(512))),
        ("1200 B", bytes((i * 13 + 1) % 256 for i in range(1200))),
    ]
    return [(name, run_id + i.to_bytes(2, "big") + body) for i, (name, body) in enumerate(bodies)]


class Responder:
    __slots__ = ("address", "altered", "duplicates", "echoed", "rtts_ms")

    def __init__(self, address: str) -> None:
        self.address = address
        self.echoed: set[int] = set()
        self.altered = 0
        self.duplicates = 0
        self.rtts_ms: list[float] = []

    def summary(self, sent: int) -> dict[str, Any]:
        return {
            "address": self.address,
            "echoed": len(self.echoed),
            "altered": self.altered,
            "missing": sent - len(self.echoed),
            "duplicates": self.duplicates,
            "rtt_ms_median": round(statistics.median(self.rtts_ms), 3) if self.rtts_ms else None,
        }


def run(target: Target, timeout: float, expect_responders: int = 0) -> list[Step]:
    """Send the set, gather for ``timeout`` (and SETTLE) after the last, judge each member."""
    assert target.group is not None
    started = time.monotonic()
    sock, group = group_socket(target, timeout)
    run_id = os.urandom(6)
    sent = datagrams(run_id)
    responders: dict[str, Responder] = {}
    stray = 0
    try:
        sock.setblocking(False)
        t0: list[float] = []
        for _, payload in sent:
            t0.append(time.monotonic())
            try:
                sock.sendto(payload, group)
            except OSError as exc:
                raise Unreachable(f"{target.url}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout + SETTLE
        while (left := deadline - time.monotonic()) > 0:
            import select

            if not select.select([sock], [], [], left)[0]:
                break
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            now = time.monotonic()
            if len(data) < _TAG or data[:6] != run_id:
                stray += 1  # not this probe's: another sender's, or an answer altered there
                continue
            index = int.from_bytes(data[6:_TAG], "big")
            who = responders.setdefault(addr[0], Responder(addr[0]))
            if index >= len(sent) or data != sent[index][1]:
                who.altered += 1
            elif index in who.echoed:
                who.duplicates += 1
            else:
                who.echoed.add(index)
                who.rtts_ms.append((now - t0[index]) * 1e3)
    finally:
        sock.close()
    return judge(target, sent, responders, stray, expect_responders, time.monotonic() - started)


def judge(
    target: Target,
    sent: list[tuple[str, bytes]],
    responders: dict[str, Responder],
    stray: int,
    expect: int,
    seconds: float,
) -> list[Step]:
    group = target.group
    assert group is not None
    on = f" on {group.iface}" if group.iface else ""
    steps = [
        Step(
            "group: sent",
            PASS,
            f"{len(sent)} datagrams to {target.host}{on} (ttl {group.ttl}, loop "
            f"{int(group.loop)}); answers gathered by who sent them",
            seconds,
            {"sent": len(sent), "stray_answers": stray},
        )
    ]
    n = len(sent)
    for address in sorted(responders, key=address_key):
        r = responders[address]
        s = r.summary(n)
        ok = s["echoed"] == n and not r.altered
        words = [f"{s['echoed']}/{n} echoed"]
        if r.altered:
            words.append(f"{r.altered} altered")
        if s["missing"]:
            words.append(f"{s['missing']} missing")
        if r.duplicates:
            words.append(f"{r.duplicates} duplicated")
        if s["rtt_ms_median"] is not None:
            words.append(f"round trip {s['rtt_ms_median']:.2f} ms (median)")
        steps.append(Step(f"responder {address}", PASS if ok else FAIL, ", ".join(words), 0.0, s))
    count = len(responders)
    if expect and count < expect:
        verdict, detail = FAIL, f"{count} answered, fewer than --expect-responders {expect}"
    elif not count:
        verdict, detail = FAIL, "no member of the group answered"
    else:
        verdict = PASS
        detail = f"{count} answered" + (f" (at least {expect} expected)" if expect else "")
    steps.append(Step("group: responders", verdict, detail, 0.0, {"responders": count}))
    return steps
