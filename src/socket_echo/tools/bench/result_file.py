"""A bench results file read back (``socket-echo report``'s input): every field checked on load,
in this one place, into a typed :class:`ResultFile`; the merge reads only that.

A results file is input from anywhere (another machine, a CI artefact, a hand edit), so nothing
in it is trusted: each field has its type, its range and finiteness checked; every count a file
can claim (segments, seconds, error kinds, the text of a histogram, the file's own size, its
nesting) has a bound, and a histogram's header is read before anything is allocated from it
(HdrHistogram would size its counts from the header and inflate the payload without a limit).
Anything else is one line naming the file and the field (:class:`ResultError`, exit 2).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import struct
import zlib
from typing import Any

from hdrh.histogram import HdrHistogram

from socket_echo.config import MAX_CONNECTIONS, MAX_RATE, MAX_SECONDS
from socket_echo.tools.defaults import MODES

FORMAT = "socket-echo bench 2"  # the JSON's "format": what report reads
LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3  # every histogram's range and precision

MAX_FILE_BYTES = 256 << 20  # a day of per-second histograms is ~100 MiB
MAX_SEGMENTS = 10_000  # segments a run may claim (k6-operator runs tens)
MAX_PER_SECOND = int(MAX_SECONDS) + 1  # seconds a file may carry (bench's longest run)
MAX_ERROR_KINDS = 1_000
MAX_TEXT = 4_096  # a target, a mode, an error kind
MAX_HISTOGRAM_TEXT = 1 << 20  # base64 of a full histogram is ~300 KB
MAX_COUNT = 2**63 - 1  # what a 64-bit counter holds
MAX_FIGURE = 1e18  # a rate, a percentage, a time: any finite figure a run can produce

_EXTERNAL = struct.Struct(">II")  # cookie, length (HdrHistogram V2, base64-wrapped)
_PAYLOAD = struct.Struct(">IIIIQQd")  # cookie, length, offset, digits, lowest, highest, ratio
_COMPRESSED_COOKIE, _ENCODING_COOKIE = 0x1C849304, 0x1C849303  # V2, lower nibble masked
_COUNTS_LEN = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS).counts_len
_MAX_PAYLOAD = _PAYLOAD.size + 9 * _COUNTS_LEN  # LEB128/ZigZag: at most 9 bytes a counter


class ResultError(ValueError):
    """A results file report cannot read, or results that cannot be added; one line."""


@dataclasses.dataclass(frozen=True)
class Second:
    t: float  # Unix time the second starts
    requests: int
    histogram: str  # V2, checked; decoded only when added


@dataclasses.dataclass(frozen=True)
class Flow:
    """The latency-under-load flow of a stream run (``under_load``)."""

    rate: float
    size: int
    requests: int
    errors: int
    mismatches: int
    histogram: str
    histogram_uncorrected: str


COUNTS = (
    "requests", "errors", "mismatches", "lost_datagrams", "late_datagrams",
    "duplicate_datagrams", "sends", "late_sends", "held_sends",
)  # fmt: skip
RATES = ("requests_per_second", "megabytes_per_second")


@dataclasses.dataclass(frozen=True)
class ResultFile:
    path: str
    target: str
    mode: str
    latency_from: str
    counts: dict[str, int]  # COUNTS
    rates: dict[str, float]  # RATES
    histogram: str
    histogram_uncorrected: str | None  # the open loop's
    histogram_lateness: str | None
    error_kinds: dict[str, int]
    late_send_threshold_us: int
    client_cpu_percent: float
    client_spin_percent: float
    client_saturated: bool
    window_start: float
    window_seconds: float
    segment: tuple[int, int]  # index, count
    parameters: dict[str, Any]  # scalars only, checked
    per_second: list[Second]
    under_load: Flow | None


def load(path: str) -> ResultFile:
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

    def result(self, data: dict[str, Any]) -> ResultFile:
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
        return ResultFile(
            path=self.path,
            target=self.text(g(data, "target", ""), "target"),
            mode=self.mode(g(data, "mode", "")),
            latency_from=self.text(data.get("latency_from", "send"), "latency_from"),
            counts={k: self.whole(data.get(k) or 0, k) for k in COUNTS},
            rates={k: self.number(data.get(k) or 0, k) for k in RATES},
            histogram=self.histogram(g(data, "histogram", ""), "histogram"),
            histogram_uncorrected=optional["histogram_uncorrected"],
            histogram_lateness=optional["histogram_lateness"],
            error_kinds={
                self.text(k, "error_kinds"): self.whole(v, f"error_kinds.{k[:40]}")
                for k, v in kinds.items()
            },
            late_send_threshold_us=self.whole(
                data.get("late_send_threshold_us", 0), "late_send_threshold_us"
            ),
            client_cpu_percent=self.number(data.get("client_cpu_percent") or 0, "client_cpu"),
            client_spin_percent=self.number(data.get("client_spin_percent") or 0, "client_spin"),
            client_saturated=self.flag(data.get("client_saturated", False), "client_saturated"),
            window_start=start,
            window_seconds=seconds,
            segment=(index, count),
            parameters=self.parameters(self.table(g(data, "parameters", ""), "parameters")),
            per_second=[self.second(s, f"per_second[{i}]") for i, s in enumerate(per_second)],
            under_load=self.flow(data["under_load"]) if data.get("under_load") else None,
        )

    def mode(self, value: Any) -> str:
        mode = self.text(value, "mode")
        if mode not in MODES:
            raise self.fail("mode", f"{_short(mode)} is none of {', '.join(MODES)}")
        return mode

    def parameters(self, p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in p.items():  # what is shown as it came: scalars only
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise self.fail(f"parameters.{key[:40]}", f"a scalar expected, not {_kind(value)}")
            if isinstance(value, float):
                self.number(value, f"parameters.{key[:40]}", -MAX_FIGURE)
            if isinstance(value, str):
                self.text(value, f"parameters.{key[:40]}")
        g = self.get
        out.update(p)
        out["size"] = self.whole(g(p, "size", "parameters"), "parameters.size", 1, 1 << 30)
        out["connections"] = self.whole(
            g(p, "connections", "parameters"), "parameters.connections", 1, MAX_CONNECTIONS
        )
        out["processes"] = self.whole(p.get("processes") or 1, "parameters.processes", 1, 4096)
        rate = p.get("rate")
        out["rate"] = self.number(rate, "parameters.rate", 0, MAX_RATE) if rate else None
        out["duration"] = self.number(p.get("duration") or 0, "parameters.duration", 0, MAX_SECONDS)
        out["segment"] = self.text(p.get("segment", "0/1"), "parameters.segment", 64)
        return out

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
        return Flow(
            rate=self.number(g(f, "rate", "under_load"), "under_load.rate", 0, MAX_RATE),
            size=self.whole(g(f, "size", "under_load"), "under_load.size", 1, 1 << 30),
            requests=self.whole(g(f, "requests", "under_load"), "under_load.requests"),
            errors=self.whole(g(f, "errors", "under_load"), "under_load.errors"),
            mismatches=self.whole(g(f, "mismatches", "under_load"), "under_load.mismatches"),
            histogram=self.histogram(g(f, "histogram", "under_load"), "under_load.histogram"),
            histogram_uncorrected=self.histogram(
                g(f, "histogram_uncorrected", "under_load"), "under_load.histogram_uncorrected"
            ),
        )


def check_histogram(text: str, where: str) -> None:
    """A V2 histogram of bench's range and precision, its payload inflating to no more than
    such a histogram holds: checked before HdrHistogram allocates anything from it."""
    if len(text) > MAX_HISTOGRAM_TEXT:
        raise ResultError(f"{where}: not an HdrHistogram ({len(text):,} characters)")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise ResultError(f"{where}: not an HdrHistogram (not base64)") from None
    if len(raw) < _EXTERNAL.size:
        raise ResultError(f"{where}: not an HdrHistogram (too short)")
    cookie, length = _EXTERNAL.unpack_from(raw)
    if cookie & ~0xF0 != _COMPRESSED_COOKIE or length != len(raw) - _EXTERNAL.size:
        raise ResultError(f"{where}: not an HdrHistogram (not V2 compressed)")
    inflate = zlib.decompressobj()
    try:
        payload = inflate.decompress(raw[_EXTERNAL.size :], _MAX_PAYLOAD)
    except zlib.error:
        raise ResultError(f"{where}: not an HdrHistogram (its payload does not inflate)") from None
    if inflate.unconsumed_tail or len(payload) < _PAYLOAD.size:
        raise ResultError(f"{where}: not an HdrHistogram (its payload has the wrong size)")
    cookie, _, _, digits, lowest, highest, _ = _PAYLOAD.unpack_from(payload)
    if cookie & ~0xF0 != _ENCODING_COOKIE:
        raise ResultError(f"{where}: not an HdrHistogram (not V2 encoded)")
    if (lowest, highest, digits) != (LOWEST_US, HIGHEST_US, DIGITS):
        raise ResultError(
            f"{where}: an HdrHistogram of {lowest}..{highest} at {digits} digits, not bench's "
            f"{LOWEST_US}..{HIGHEST_US} at {DIGITS}: it does not add"
        )


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), "null" if value is None else f"a {type(value).__name__}"
    )


def _short(value: Any) -> str:
    huge = isinstance(value, int) and value.bit_length() >= 128
    text = "a huge number" if huge else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
