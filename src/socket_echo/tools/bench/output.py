"""How bench and report show a result (result.BenchResult): a rich table on a terminal, plain
lines in a pipe; notes and warnings beside the figures on stderr; the files asked for (the
JSON, the latency plot, HdrHistogram's ``.hgrm``); the live progress line."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from socket_echo.tools.bench import compare
from socket_echo.tools.bench.compare import Comparison
from socket_echo.tools.bench.result import BenchResult, Spectrum
from socket_echo.tools.bench.slo import Verdict
from socket_echo.tools.bench.statistics import behind_us
from socket_echo.tools.defaults import BEHIND_SHARE

SILENT_BEFORE_END = 1.5  # s: a member whose last answer came this long before the end went silent


class OutputError(ValueError):
    """An output that cannot be written: one line, before the run (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where the figures go besides the table: ``-`` is stdout (the table then goes to
    stderr)."""

    json_file: str | None = None
    plot_file: str | None = None
    hgrm_file: str | None = None

    def check(self) -> None:
        """Fail before the run, not after it."""
        if self.json_file == "-" and self.hgrm_file == "-":
            raise OutputError("--json - and --hgrm - cannot both have stdout")
        for out in (self.json_file, self.plot_file, self.hgrm_file):
            if out and out != "-":
                folder = os.path.dirname(os.path.abspath(out))
                if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                    raise OutputError(f"cannot write {out}: {folder} is not a writable folder")
        if self.plot_file:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise OutputError("--plot needs matplotlib (pip install matplotlib)") from None

    @property
    def stdout_taken(self) -> bool:
        return "-" in (self.json_file, self.hgrm_file)


def show(
    result: BenchResult,
    outputs: Outputs,
    note: str | None = None,
    verdicts: Sequence[tuple[Verdict, str]] = (),
    comparison: Comparison | None = None,
) -> None:
    """The table (stderr when stdout carries JSON or hgrm) with the objectives' verdicts
    (each with its unit) and an A/B comparison, then the files asked for (the plot of both
    sides when compared); OSError when one cannot be written."""
    out = sys.stderr if outputs.stdout_taken else sys.stdout
    table(result, out, note)
    for verdict, unit in verdicts:
        print(verdict.line(unit), file=out)
    if comparison is not None:
        compare.show(comparison, out)
    if outputs.plot_file and comparison is not None and comparison.base is not None:
        base = comparison.base
        spectra(
            outputs.plot_file,
            f"socket-echo report --compare: {result.mode}",
            [(f"base: {base.target}, {base.requests_per_second:,.0f} req/s", base),
             (f"new: {result.target}, {result.requests_per_second:,.0f} req/s", result)],
        )  # fmt: skip
    elif outputs.plot_file:
        plot(result, outputs.plot_file)
    if outputs.hgrm_file:
        write_hgrm(result, outputs.hgrm_file)
    if outputs.json_file:
        fields = result.to_dict()
        if verdicts:
            fields["slo"] = [v.to_dict() for v, _ in verdicts]
        if comparison is not None:
            fields["comparison"] = comparison.to_dict()
        text = json.dumps(fields, indent=2)
        if outputs.json_file == "-":
            print(text, flush=True)
        else:
            with open(outputs.json_file, "w") as f:
                f.write(text + "\n")


def _spectrum(lat: Spectrum) -> str:
    keys = ("p50", "p90", "p99", "p999", "p9999", "max")
    return "  ".join(f"{k} {lat[k]:,}" for k in keys if lat[k] is not None)


def responder_rows(r: BenchResult) -> list[tuple[str, str]]:
    """A group's members, one row each (in address order), the slowest at the median marked;
    one that stopped answering well before the end is said to have gone silent."""
    slowest = max(r.responders, key=lambda m: m.latency_us.p50 or 0)
    rows = [("responders", f"{len(r.responders)} member(s) of the group answered")]
    for m in r.responders:
        lat = m.latency_us
        spectrum = f"p50 {lat.p50:,} p99 {lat.p99:,} µs" if lat.p50 is not None else "—"
        mark = "  (slowest)" if m is slowest and len(r.responders) > 1 else ""
        silent = m.lost and m.last_s < r.window.seconds - SILENT_BEFORE_END
        rows.append(
            (
                f"  {m.address}",
                f"answered {m.answered:,}, lost {m.lost:,}, duplicated {m.duplicates:,}, "
                f"reordered {m.reordered:,}; {spectrum}; first answer at {m.first_s:.1f} s"
                + (f", silent after {m.last_s:.1f} s" if silent else "")
                + mark,
            )
        )
    return rows


def lines(r: BenchResult) -> list[tuple[str, str]]:
    rows = [
        ("target", f"{r.target} ({r.mode})"),
        ("requests/s", f"{r.requests_per_second:,.0f}"),
        ("MB/s", f"{r.megabytes_per_second:,.2f}"),
    ]
    uncorrected = r.latency_uncorrected_us
    if r.latency_us.p50 is not None:
        name = "latency µs" if not uncorrected else "latency µs (from slot)"
        rows.append((name, _spectrum(r.latency_us)))
    if uncorrected and uncorrected.p50 is not None:
        rows.append(("  (from send)", _spectrum(uncorrected)))
    if r.sends:
        rows.append(
            (
                "sends",
                f"{r.sends:,}: {r.late_sends:,} late (over {r.late_send_threshold_us} µs, ours), "
                f"{r.held_sends:,} held (window full, the server's)",
            )
        )
    lateness = r.send_lateness_us
    if lateness and lateness.p50 is not None:
        keys = ("p50", "p99", "p999", "max")
        rows.append(("  after slot µs", "  ".join(f"{k} {lateness[k]:,}" for k in keys)))
    if r.responders:
        rows += responder_rows(r)
    if r.tls_handshakes:
        rows.append(
            ("TLS", f"{r.tls_handshakes:,} handshakes, {r.tls_resumed:,} of them resumed sessions")
        )
    pc = r.per_connection
    if pc.answers:
        s = pc.summary()
        first = (
            f"; first answer after {s['first_answer_median_s'] * 1e3:,.1f} ms (median), "
            f"{s['first_answer_max_s'] * 1e3:,.1f} ms (last)"
            if s["first_answer_median_s"] is not None
            else ""
        )
        rows.append(
            (
                "connections",
                f"{s['connections']:,}: answers each min {s['min']:,}, median {s['median']:,}, "
                f"max {s['max']:,} (fairness {s['fairness'] or 0:.2f}){first}; "
                f"{s['never_answered']:,} never answered, {s['replacements']:,} replaced",
            )
        )
    t = r.transport.summary(r.megabytes_per_second * r.window.seconds)
    if t["connections_sampled"]:
        per_mb = t["retransmitted_per_mb"]
        rows.append(
            (
                "transport",
                f"{t['retransmitted_segments']:,} segment(s) retransmitted"
                + (f" ({per_mb:g}/MB)" if per_mb is not None else "")
                + f"; kernel RTT p50 {t['kernel_rtt_p50_us']:,} µs, p90 "
                f"{t['kernel_rtt_p90_us']:,}, max {t['kernel_rtt_max_us']:,} (TCP_INFO, "
                f"{t['connections_sampled']} connection(s))",
            )
        )
    if r.ended_gracefully or r.resets_sent:
        rows.append(
            (
                "ending",
                f"{r.ended_gracefully:,} with FIN after their echo ({r.drained_bytes:,} B owed "
                f"read), {r.resets_sent:,} reset",
            )
        )
    kinds = ", ".join(f"{k}: {v}" for k, v in r.error_kinds.items())
    rows += [
        ("errors", str(r.errors) + (f" ({kinds})" if r.errors else "")),
        ("mismatches", str(r.mismatches)),
        (
            "client CPU",
            f"{r.client_cpu_percent:.0f}% per process"
            + (
                f" ({r.client_spin_percent:.0f}% of it polling for the next slot)"
                if r.client_spin_percent >= 1
                else ""
            ),
        ),
    ]
    if r.segment.count > 1:
        which = (
            f"{r.segment.index} of {r.segment.count}"
            if r.segment.index is not None
            else f"{len(r.segment.merged or ())} of {r.segment.count} added"
        )
        rows.append(("segments", which))
    flow = r.under_load
    if flow and flow.latency_us.p50 is not None:
        rows.append(
            (
                "under load µs",
                f"{_spectrum(flow.latency_us)}  ({flow.size} B ping-pong at {flow.rate:g}/s "
                f"beside the load; {flow.errors + flow.mismatches} errors)",
            )
        )
    if r.mode == "udp":
        rows.append(("lost datagrams", str(r.lost_datagrams)))
        rows.append(("late answers", str(r.late_datagrams)))
        rows.append(("duplicate answers", str(r.duplicate_datagrams)))
    return rows


def table(r: BenchResult, out: TextIO | None = None, note: str | None = None) -> None:
    """The human table, on ``out`` (stdout; stderr when stdout carries ``--json -``); the
    notes and warnings on stderr."""
    out = out or sys.stdout
    rows = lines(r)
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(show_header=False, title="socket-echo bench", title_justify="left")
        for k, v in rows:
            t.add_row(k, v)
        Console(file=out).print(t)
    else:
        for k, v in rows:
            print(f"{k:<15} {v}", file=out)
    if r.loss_explanation:
        print(f"note: {r.loss_explanation}", file=out)
    never, n = r.per_connection.never_answered, len(r.per_connection.answers)
    if never:
        print(
            f"note: {never} of {n} connections never got an answer: the peer serves "
            f"{n - never} client(s) at a time, or fewer than asked (a one-client-at-a-time loop "
            "like Zephyr's echo sample keeps the others in its backlog); each counts as an error",
            file=out,
        )
    if note:
        print(f"note: {note}", file=sys.stderr)
    for line in warnings(r):
        print(line, file=sys.stderr)


def warnings(r: BenchResult) -> list[str]:
    """Lines that say the figures measure the load generator as much as the server."""
    out = []
    if r.generator_behind:
        out.append(
            f"warning: over {BEHIND_SHARE:.0%} of {r.sends:,} sends left "
            f"{behind_us(r.late_send_threshold_us)} us "
            "or more after their slot with room to go: the load generator, not the server, fell "
            "behind its schedule (lower --rate, add --processes, or run segments on more "
            "machines)"
        )
    if r.held_sends:
        out.append(
            f"note: {r.held_sends:,} sends waited for an echo ({r.parameters.in_flight} in "
            "flight per connection): the server was behind the schedule; corrected latency "
            "counts that wait"
        )
    if r.resets_sent:
        out.append(
            f"warning: {r.resets_sent:,} connection(s) ended with a reset: the peer had not "
            f"closed within --drain-timeout ({r.parameters.drain_timeout:g} s) after bench's FIN "
            "(a firmware loop like Zephyr's echo sample wedges on a reset: check the device)"
        )
    if r.client_saturated:
        out.append(
            "warning: the load generator used its whole CPU: these figures measure the "
            "client as much as the server (add --processes, or pin server and client apart)"
        )
    return out


def plot(r: BenchResult, path: str) -> None:
    title = f"socket-echo bench {r.mode} {r.target}: {r.requests_per_second:,.0f} req/s"
    spectra(path, title, [(None, r)])


PERCENTILES_PLOTTED = (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100)


def spectra(path: str, title: str, series: Sequence[tuple[str | None, BenchResult]]) -> None:
    """Latency by percentile on the usual log scale, one line per result (labelled when
    there are several: report --compare's base and new)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [1 / (1 - p / 100) if p < 100 else 1e6 for p in PERCENTILES_PLOTTED]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in series:
        hist = r.decoded()
        ys = [hist.get_value_at_percentile(p) for p in PERCENTILES_PLOTTED]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(
        [1, 10, 100, 1000, 10000, 100000, 1e6],
        ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "max"],
    )
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (µs)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if any(label for label, _ in series):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_hgrm(r: BenchResult, path: str) -> None:
    """HdrHistogram's percentile distribution (what its plotter and HistogramLogAnalyzer
    read), values in microseconds; ``-``: stdout."""
    hist = r.decoded()
    if path == "-":
        sys.stdout.flush()
        hist.output_percentile_distribution(sys.stdout.buffer, 1.0)
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as f:
        hist.output_percentile_distribution(f, 1.0)


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
