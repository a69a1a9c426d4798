"""Why UDP answers went missing, in words a user can act on: the run's ``loss_explanation``."""

from __future__ import annotations

from socket_echo.config import DEFAULT_UDP_BURST, DEFAULT_UDP_MAX_RATE, DEFAULT_UDP_RATE
from socket_echo.tools.bench.model import BenchConfig
from socket_echo.tools.connect.target import is_loopback
from socket_echo.tools.defaults import UDP_TIMEOUT


def explain_losses(cfg: BenchConfig, answered: int, lost: int, elapsed: float) -> str | None:
    """Why UDP answers went missing, in words a user can act on (None when none did)."""
    if cfg.mode != "udp" or not lost:
        return None
    if cfg.target.group is not None:  # per member: the rows above say whose answers
        return (
            f"{lost} answers owed by members of the group never came within {UDP_TIMEOUT:g} s "
            "(the responders' rows say whose: a member that went silent, or loss on its path)"
        )
    text = (
        f"{lost} of {answered + lost} datagrams got no answer within {UDP_TIMEOUT:g} s "
        f"(each was sent again)"
    )
    rate = answered / elapsed if elapsed else 0.0
    per_source = DEFAULT_UDP_RATE + DEFAULT_UDP_BURST / max(elapsed, 1.0)
    if rate <= 1.2 * per_source:
        text += f"; answers held at about {rate:,.0f}/s, the signature of a per-source rate limit"
    if is_loopback(cfg.target):
        text += (
            ". The target is on this machine: if it is a socket-echo server, its per-source "
            f"limit ({DEFAULT_UDP_RATE:g} datagrams/s per /24 or /56 prefix, burst "
            f"{DEFAULT_UDP_BURST}; all of loopback is one prefix) and its global limit "
            f"({DEFAULT_UDP_MAX_RATE:g}/s) apply to benchmarks too: start it with "
            "--udp-rate 1e7 --udp-burst 100000 --udp-max-rate 1e7 to measure its speed; its "
            "/metrics counts drops by reason (socket_echo_udp_dropped_total)"
        )
    else:
        text += (
            ". A rate limit on the server, a full socket buffer, or loss on the path: the "
            "server's own counters tell which"
        )
    return text
