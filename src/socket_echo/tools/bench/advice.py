"""What bench says beside its figures: why UDP answers went missing, when the load generator
(not the server) was the limit or fell behind its schedule, and the latency plot."""

from __future__ import annotations

import sys
from typing import Any

from socket_echo.config import DEFAULT_UDP_BURST, DEFAULT_UDP_MAX_RATE, DEFAULT_UDP_RATE
from socket_echo.tools.bench.load import UDP_TIMEOUT
from socket_echo.tools.bench.model import BenchConfig
from socket_echo.tools.connect.target import is_loopback
from socket_echo.tools.defaults import BEHIND_SHARE, BEHIND_US


def explain_losses(cfg: BenchConfig, answered: int, lost: int, elapsed: float) -> str | None:
    """Why UDP answers went missing, in words a user can act on (None when none did)."""
    if cfg.mode != "udp" or not lost:
        return None
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


def warnings(summary: dict[str, Any]) -> list[str]:
    """Lines that say the figures measure the load generator as much as the server."""
    out = []
    if summary.get("generator_behind"):
        out.append(
            f"warning: over {BEHIND_SHARE:.0%} of {summary['sends']:,} sends left {BEHIND_US} us "
            "or more after their slot with room to go: the load generator, not the server, fell "
            "behind its schedule (lower --rate, add --processes, or run segments on more "
            "machines)"
        )
    if summary.get("held_sends"):
        window = summary["parameters"].get("in_flight")
        out.append(
            f"note: {summary['held_sends']:,} sends waited for an echo ({window} in flight per "
            "connection): the server was behind the schedule; corrected latency counts that wait"
        )
    if summary.get("client_saturated"):
        out.append(
            "warning: the load generator used its whole CPU: these figures measure the "
            "client as much as the server (add --processes, or pin server and client apart)"
        )
    return out


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["_histogram"]
    points = [
        (p, hist.get_value_at_percentile(p))
        for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100)
    ]
    xs = [1 / (1 - p / 100) if p < 100 else 1e6 for p, _ in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [v for _, v in points], marker="o")
    ax.set_xscale("log")
    ax.set_xticks(
        [1, 10, 100, 1000, 10000, 100000, 1e6],
        ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "max"],
    )
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (µs)")
    ax.set_title(
        f"socket-echo bench {summary['mode']} {summary['target']}: "
        f"{summary['requests_per_second']:,.0f} req/s"
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_hgrm(summary: dict[str, Any], path: str) -> None:
    """HdrHistogram's percentile distribution (what its plotter and HistogramLogAnalyzer
    read), values in microseconds; ``-``: stdout."""
    if path == "-":
        sys.stdout.flush()
        summary["_histogram"].output_percentile_distribution(sys.stdout.buffer, 1.0)
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as f:
        summary["_histogram"].output_percentile_distribution(f, 1.0)
