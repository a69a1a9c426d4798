"""A bench results file read back (``socket-echo report``'s input): every field checked on load,
in this one place, into the typed result a run makes (result.BenchResult); the merge reads only
that.

A results file is input from anywhere (another machine, a CI artefact, a hand edit), so nothing
in it is trusted: each field has its type, its range and finiteness checked; every count a file
can claim (segments, seconds, error kinds, the text of a histogram, the file's own size, its
nesting) has a bound, and a histogram's header is read before anything is allocated from it
(HdrHistogram would size its counts from the header and inflate the payload without a limit).
Anything else is one line naming the file and the field (:class:`ResultError`, exit 2).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from socket_echo.config import MAX_CONNECTIONS, MAX_RATE, MAX_SECONDS
from socket_echo.tools.bench.histograms import check_histogram, decode
from socket_echo.tools.bench.result import (
    COUNTED,
    FORMAT,
    BenchResult,
    Flow,
    Parameters,
    PerConnection,
    Responder,
    ResultError,
    Second,
    Segment,
    Spectrum,
    Transport,
    Window,
)
from socket_echo.tools.defaults import MAX_SEGMENTS, MODES

MAX_FILE_BYTES = 256 << 20  # a day of per-second histograms is ~100 MiB
MAX_PER_SECOND = int(MAX_SECONDS) + 1  # seconds a file may carry (bench's longest run)
MAX_ERROR_KINDS = 1_000
MAX_TEXT = 4_096  # a target, a mode, an error kind
MAX_COUNT = 2**63 - 1  # what a 64-bit counter holds
MAX_FIGURE = 1e18  # a rate, a percentage, a time: any finite figure a run can produce


RATES = ("requests_per_second", "megabytes_per_second")


def load(path: str) -> BenchResult:
    """One results file, every field checked; ResultError (one line) otherwise."""
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise ResultError(
                f"{path}: {size:,} bytes, more than a results file holds "
                f"({MAX_FILE_BYTES >> 20} MiB at most)"
            )
        with open(path, encoding="utf-8") as f:
            data = json.load(f, parse_constant=_no_constant)
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from None
    except RecursionError:
        raise ResultError(f"{path}: not a bench result (JSON nested too deep)") from None
    except _NotANumber as exc:
        raise ResultError(f"{path}: not a bench result ({exc})") from None
    except (ValueError, UnicodeError) as exc:
        raise ResultError(
            f"{path}: not a bench result (malformed or truncated JSON: {exc})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultError(f'{path}: not a bench result of this version (no "format": "{FORMAT}")')
    return _Reader(path).result(data)


class _NotANumber(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotANumber(f"{name} is not a number a result holds")


class _Reader:
    """Reads one file's fields; every mistake names the file and the field's path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> ResultError:
        return ResultError(f"{self.path}: not a bench result ({where}: {what})")

    def get(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise ResultError(f"{self.path}: not a bench result (no '{key}' in {where or 'it'})")
        return obj[key]

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"an object expected, not {_kind(value)}")
        return value

    def whole(self, value: Any, where: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"a whole number expected, not {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(where, f"{_short(value)} is outside {lo:,}..{hi:,}")
        return value

    def number(self, value: Any, where: str, lo: float = 0.0, hi: float = MAX_FIGURE) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"a number expected, not {_kind(value)}")
        try:
            x = float(value)
        except OverflowError:
            raise self.fail(where, f"{_short(value)} is outside {lo:g}..{hi:g}") from None
        if not (math.isfinite(x) and lo <= x <= hi):
            raise self.fail(where, f"{_short(value)} is outside {lo:g}..{hi:g}")
        return x

    def text(self, value: Any, where: str, limit: int = MAX_TEXT) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"text expected, not {_kind(value)}")
        if len(value) > limit:
            raise self.fail(where, f"{len(value):,} characters, more than {limit:,}")
        return value

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"true or false expected, not {_kind(value)}")
        return value

    def histogram(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise ResultError(
                f"{self.path}: {where}: not an HdrHistogram (a {type(value).__name__})"
            )
        check_histogram(value, f"{self.path}: {where}")
        return value

    def spectrum(self, text: str) -> Spectrum:
        """A figure's spectrum, from its histogram (not from the file's numbers: those are
        what the histogram says, or the file is wrong)."""
        return Spectrum.of(decode(text, self.path))

    def result(self, data: dict[str, Any]) -> BenchResult:
        g = self.get
        segment = self.table(g(data, "segment", ""), "segment")
        count = self.whole(g(segment, "count", "segment"), "segment.count", 1, MAX_SEGMENTS)
        index = self.whole(g(segment, "index", "segment"), "segment.index", 0, count - 1)
        window = self.table(g(data, "window", ""), "window")
        start = self.number(g(window, "start", "window"), "window.start")
        seconds = self.number(g(window, "seconds", "window"), "window.seconds", 0, MAX_SECONDS)
        kinds = self.table(data.get("error_kinds") or {}, "error_kinds")
        if len(kinds) > MAX_ERROR_KINDS:
            raise self.fail("error_kinds", f"{len(kinds):,} kinds, more than {MAX_ERROR_KINDS:,}")
        per_second = data.get("per_second") or []
        if not isinstance(per_second, list):
            raise self.fail("per_second", f"a list expected, not {_kind(per_second)}")
        if len(per_second) > MAX_PER_SECOND:
            raise self.fail("per_second", f"{len(per_second):,} seconds, more than a run has")
        optional = {
            key: self.histogram(data[key], key) if data.get(key) is not None else None
            for key in ("histogram_uncorrected", "histogram_lateness")
        }
        histogram = self.histogram(g(data, "histogram", ""), "histogram")
        counts = {k: self.whole(data.get(k) or 0, k) for k in COUNTED}
        rates = {k: self.number(data.get(k) or 0, k) for k in RATES}
        uncorrected, lateness = optional["histogram_uncorrected"], optional["histogram_lateness"]
        return BenchResult(
            target=self.text(g(data, "target", ""), "target"),
            mode=self.mode(g(data, "mode", "")),
            requests_per_second=rates["requests_per_second"],
            megabytes_per_second=rates["megabytes_per_second"],
            **counts,
            latency_from=self.text(data.get("latency_from", "send"), "latency_from"),
            latency_us=self.spectrum(histogram),
            latency_uncorrected_us=self.spectrum(uncorrected) if uncorrected else None,
            send_lateness_us=self.spectrum(lateness) if lateness else None,
            generator_behind=self.flag(data.get("generator_behind", False), "generator_behind"),
            histogram=histogram,
            histogram_uncorrected=uncorrected,
            histogram_lateness=lateness,
            error_kinds={
                self.text(k, "error_kinds"): self.whole(v, f"error_kinds.{k[:40]}")
                for k, v in kinds.items()
            },
            per_connection=self.per_connection(data.get("per_connection") or {}),
            transport=self.transport(data.get("transport") or {}),
            late_send_threshold_us=self.whole(
                data.get("late_send_threshold_us", 0), "late_send_threshold_us"
            ),
            client_cpu_percent=self.number(data.get("client_cpu_percent") or 0, "client_cpu"),
            client_spin_percent=self.number(data.get("client_spin_percent") or 0, "client_spin"),
            client_saturated=self.flag(data.get("client_saturated", False), "client_saturated"),
            window=Window(start, seconds),
            segment=Segment(index, count),
            parameters=self.parameters(self.table(g(data, "parameters", ""), "parameters")),
            per_second=tuple(self.second(s, f"per_second[{i}]") for i, s in enumerate(per_second)),
            loss_explanation=self.optional_text(data.get("loss_explanation"), "loss_explanation"),
            under_load=self.flow(data["under_load"]) if data.get("under_load") else None,
            responders=self.responders(data.get("responders") or []),
        )

    def responders(self, value: Any) -> tuple[Responder, ...]:
        if not isinstance(value, list) or len(value) > MAX_CONNECTIONS:
            raise self.fail("responders", "a list of one entry per member of the group")
        out = []
        for i, r in enumerate(value):
            where = f"responders[{i}]"
            r = self.table(r, where)
            g = self.get
            histogram = self.histogram(g(r, "histogram", where), f"{where}.histogram")
            out.append(
                Responder(
                    address=self.text(g(r, "address", where), f"{where}.address", 64),
                    answered=self.whole(g(r, "answered", where), f"{where}.answered"),
                    lost=self.whole(r.get("lost") or 0, f"{where}.lost"),
                    duplicates=self.whole(r.get("duplicates") or 0, f"{where}.duplicates"),
                    reordered=self.whole(r.get("reordered") or 0, f"{where}.reordered"),
                    first_s=self.number(r.get("first_s") or 0, f"{where}.first_s", 0, MAX_SECONDS),
                    last_s=self.number(r.get("last_s") or 0, f"{where}.last_s", 0, MAX_SECONDS),
                    latency_us=self.spectrum(histogram),
                    histogram=histogram,
                )
            )
        return tuple(out)

    def per_connection(self, value: Any) -> PerConnection:
        p = self.table(value, "per_connection")
        answers = p.get("answers") or []
        first = p.get("first_answer_s") or []
        for name, seq in (("answers", answers), ("first_answer_s", first)):
            if not isinstance(seq, list) or len(seq) > MAX_CONNECTIONS:
                raise self.fail(f"per_connection.{name}", "a list of one entry per connection")
        if len(first) != len(answers):
            raise self.fail("per_connection", "answers and first_answer_s differ in length")
        return PerConnection(
            answers=tuple(self.whole(n, "per_connection.answers") for n in answers),
            first_answer_s=tuple(
                self.number(f, "per_connection.first_answer_s", -1.0, MAX_SECONDS) for f in first
            ),
            replacements=self.whole(p.get("replacements") or 0, "per_connection.replacements"),
        )

    def transport(self, value: Any) -> Transport:
        t = self.table(value, "transport")
        rtts = t.get("kernel_rtt_us") or []
        if not isinstance(rtts, list) or len(rtts) > MAX_CONNECTIONS:
            raise self.fail("transport.kernel_rtt_us", "a list of one entry per connection")
        return Transport(
            retransmitted_segments=self.whole(
                t.get("retransmitted_segments") or 0, "transport.retransmitted_segments"
            ),
            kernel_rtt_us=tuple(self.whole(us, "transport.kernel_rtt_us") for us in rtts),
        )

    def optional_text(self, value: Any, where: str) -> str | None:
        return None if value is None else self.text(value, where)

    def mode(self, value: Any) -> str:
        mode = self.text(value, "mode")
        if mode not in MODES:
            raise self.fail("mode", f"{_short(mode)} is none of {', '.join(MODES)}")
        return mode

    def parameters(self, p: dict[str, Any]) -> Parameters:
        for key, value in p.items():  # every field a scalar, whether it is read or not
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise self.fail(f"parameters.{key[:40]}", f"a scalar expected, not {_kind(value)}")
        g = self.get
        rate, timeout, start_at = p.get("rate"), p.get("timeout"), p.get("start_at")
        arrival = p.get("arrival")
        return Parameters(
            connections=self.whole(
                g(p, "connections", "parameters"), "parameters.connections", 1, MAX_CONNECTIONS
            ),
            size=self.whole(g(p, "size", "parameters"), "parameters.size", 1, 1 << 30),
            duration=self.number(p.get("duration") or 0, "parameters.duration", 0, MAX_SECONDS),
            processes=self.whole(p.get("processes") or 1, "parameters.processes", 1, 4096),
            rate=self.number(rate, "parameters.rate", 0, MAX_RATE) if rate else None,
            timeout=None if timeout is None else self.number(timeout, "parameters.timeout"),
            arrival=None if arrival is None else self.text(arrival, "parameters.arrival", 64),
            warmup=self.number(p.get("warmup") or 0, "parameters.warmup", 0, MAX_SECONDS),
            in_flight=self.whole(p.get("in_flight") or 1, "parameters.in_flight", 1, 1 << 20),
            start_at=None if start_at is None else self.number(start_at, "parameters.start_at"),
            segment=self.text(p.get("segment", "0/1"), "parameters.segment", 64),
            drain_timeout=self.number(
                p.get("drain_timeout") or 0, "parameters.drain_timeout", 0, MAX_SECONDS
            ),
        )

    def second(self, s: Any, where: str) -> Second:
        s = self.table(s, where)
        return Second(
            t=self.number(self.get(s, "t", where), f"{where}.t"),
            requests=self.whole(self.get(s, "requests", where), f"{where}.requests"),
            histogram=self.histogram(self.get(s, "histogram", where), f"{where}.histogram"),
        )

    def flow(self, f: Any) -> Flow:
        f = self.table(f, "under_load")
        g = self.get
        histogram = self.histogram(g(f, "histogram", "under_load"), "under_load.histogram")
        uncorrected = self.histogram(
            g(f, "histogram_uncorrected", "under_load"), "under_load.histogram_uncorrected"
        )
        return Flow(
            rate=self.number(g(f, "rate", "under_load"), "under_load.rate", 0, MAX_RATE),
            size=self.whole(g(f, "size", "under_load"), "under_load.size", 1, 1 << 30),
            requests=self.whole(g(f, "requests", "under_load"), "under_load.requests"),
            errors=self.whole(g(f, "errors", "under_load"), "under_load.errors"),
            mismatches=self.whole(g(f, "mismatches", "under_load"), "under_load.mismatches"),
            latency_us=self.spectrum(histogram),
            latency_uncorrected_us=self.spectrum(uncorrected),
            histogram=histogram,
            histogram_uncorrected=uncorrected,
        )


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), "null" if value is None else f"a {type(value).__name__}"
    )


def _short(value: Any) -> str:
    huge = isinstance(value, int) and value.bit_length() >= 128
    text = "a huge number" if huge else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
