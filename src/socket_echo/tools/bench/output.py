"""How the tools show results: a rich table on a terminal, plain lines in a pipe, or JSON."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _spectrum(lat: dict[str, Any]) -> str:
    keys = ("p50", "p90", "p99", "p999", "p9999", "max")
    return "  ".join(f"{k} {lat[k]:,}" for k in keys if lat.get(k) is not None)


def bench_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    lat = summary["latency_us"]
    rows = [
        ("target", f"{summary['target']} ({summary['mode']})"),
        ("requests/s", f"{summary['requests_per_second']:,.0f}"),
        ("MB/s", f"{summary['megabytes_per_second']:,.2f}"),
    ]
    uncorrected = summary.get("latency_uncorrected_us")
    if lat["p50"] is not None:
        name = "latency µs" if not uncorrected else "latency µs (from slot)"
        rows.append((name, _spectrum(lat)))
    if uncorrected and uncorrected["p50"] is not None:
        rows.append(("  (from send)", _spectrum(uncorrected)))
    if summary.get("sends"):
        rows.append(
            (
                "sends",
                f"{summary['sends']:,}: {summary['late_sends']:,} late (over "
                f"{summary['late_send_threshold_us']} µs, ours), {summary['held_sends']:,} held "
                "(window full, the server's)",
            )
        )
    lateness = summary.get("send_lateness_us")
    if lateness and lateness["p50"] is not None:
        keys = ("p50", "p99", "p999", "max")
        rows.append(("  after slot µs", "  ".join(f"{k} {lateness[k]:,}" for k in keys)))
    rows += [
        (
            "errors",
            str(summary["errors"])
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in summary['error_kinds'].items())})"
                if summary["errors"]
                else ""
            ),
        ),
        ("mismatches", str(summary["mismatches"])),
        (
            "client CPU",
            f"{summary['client_cpu_percent']:.0f}% per process"
            + (
                f" ({summary['client_spin_percent']:.0f}% of it polling for the next slot)"
                if summary.get("client_spin_percent", 0) >= 1
                else ""
            ),
        ),
    ]
    segment = summary.get("segment") or {}
    if segment.get("count", 1) > 1:
        which = (
            f"{segment['index']} of {segment['count']}"
            if segment.get("index") is not None
            else f"{len(segment.get('merged', []))} of {segment['count']} added"
        )
        rows.append(("segments", which))
    flow = summary.get("under_load")
    if flow and flow["latency_us"]["p50"] is not None:
        rows.append(
            (
                "under load µs",
                f"{_spectrum(flow['latency_us'])}  ({flow['size']} B ping-pong at "
                f"{flow['rate']:g}/s beside the load; {flow['errors'] + flow['mismatches']} "
                "errors)",
            )
        )
    if summary["mode"] == "udp":
        rows.append(("lost datagrams", str(summary["lost_datagrams"])))
        rows.append(("late answers", str(summary["late_datagrams"])))
        rows.append(("duplicate answers", str(summary["duplicate_datagrams"])))
    return rows


def bench_table(
    summary: dict[str, Any], out: TextIO | None = None, note: str | None = None
) -> None:
    """The human table, on ``out`` (stdout; stderr when stdout carries ``--json -``); the
    notes and warnings on stderr."""
    from socket_echo.tools.bench.advice import warnings

    out = out or sys.stdout
    rows = bench_lines(summary)
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, title="socket-echo bench", title_justify="left")
        for k, v in rows:
            table.add_row(k, v)
        Console(file=out).print(table)
    else:
        for k, v in rows:
            print(f"{k:<15} {v}", file=out)
    if summary.get("loss_explanation"):
        print(f"note: {summary['loss_explanation']}", file=out)
    if note:
        print(f"note: {note}", file=sys.stderr)
    for line in warnings(summary):
        print(line, file=sys.stderr)


class Progress:
    """A live line on a terminal (rich), a plain line every few seconds otherwise."""

    def __init__(self, duration: float, unit: str) -> None:
        self.duration = duration
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self._last_plain = 0.0
        self._live: Any = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._live = Progress(
                TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), transient=True
            )
            self._task = self._live.add_task("starting", total=duration)
            self._live.start()

    def __call__(self, elapsed: float, done: int) -> None:
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{done:,} {self.unit} ({rate:,.0f}/s)"
        if self._live is not None:
            self._live.update(self._task, completed=min(elapsed, self.duration), description=text)
        elif elapsed - self._last_plain >= 2.0:
            self._last_plain = elapsed
            print(f"bench: {elapsed:5.1f} s  {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
