"""Listener impairments from a URL query (``tcp://0.0.0.0:4243?delay=80ms&jitter=20ms``):
parsed once at start, pure (no I/O), every mistake a ConfigError naming the parameter.

Stream listeners (tcp, tls, unix, tcp+proxy, tls+proxy): ``delay``, ``jitter`` (added before
each echo; byte order always kept), ``rate`` (echo bandwidth, bytes/s), ``reset-after`` (RST
once that many bytes were echoed), ``close-after`` (FIN after that many). Datagram listeners
(udp): ``delay``, ``jitter`` (may reorder, as a path does), ``drop`` and ``duplicate``
(percent). ``seed`` makes the random ones reproducible. Durations take units (``80ms``,
``1.5s``, ``250us``), sizes and rates take byte units (``64KiB``, ``1MiB``, ``10MB``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from urllib.parse import parse_qsl

from socket_echo.kinds import kind


class ImpairmentError(ValueError):
    """A malformed or out-of-range impairment; config.py shows it as a usage error."""


STREAM = ("delay", "jitter", "rate", "reset-after", "close-after", "seed")
DATAGRAM = ("delay", "jitter", "drop", "duplicate", "seed")
MAX_DELAY = 60.0  # seconds: a longer one is a mistake, not a path
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(us|µs|ms|s)?", re.IGNORECASE)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(i?)(b?)(/s)?", re.IGNORECASE)
RATE_SLICES_PER_SECOND = 50  # a rate-limited echo leaves in 20 ms slices, not in one burst
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


@dataclasses.dataclass(frozen=True)
class Impairments:
    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, uniform in [0, jitter) added to the delay
    rate: float = 0.0  # bytes/s of echo; 0 = unlimited
    reset_after: int = 0  # bytes; 0 = never
    close_after: int = 0
    drop: float = 0.0  # probability 0..1
    duplicate: float = 0.0
    seed: int | None = None

    def __bool__(self) -> bool:
        return any(
            (
                self.delay,
                self.jitter,
                self.rate,
                self.reset_after,
                self.close_after,
                self.drop,
                self.duplicate,
            )
        )

    @functools.cached_property
    def rate_slice(self) -> int:
        """With ``rate``: the most bytes that leave at once (one 1/RATE_SLICES_PER_SECOND s
        slice), worked out once, not per echo."""
        return max(1, int(self.rate / RATE_SLICES_PER_SECOND))

    def describe(self) -> str:
        """What the start-up log says this listener does."""
        parts = []
        if self.delay or self.jitter:
            parts.append(
                f"delay {self.delay * 1e3:g} ms"
                + (f" + jitter up to {self.jitter * 1e3:g} ms" if self.jitter else "")
            )
        if self.rate:
            parts.append(f"rate {self.rate:g} B/s")
        if self.reset_after:
            parts.append(f"reset after {self.reset_after} B")
        if self.close_after:
            parts.append(f"close after {self.close_after} B")
        if self.drop:
            parts.append(f"drop {self.drop * 100:g}%")
        if self.duplicate:
            parts.append(f"duplicate {self.duplicate * 100:g}%")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)


def duration(name: str, text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ImpairmentError(f"impairment {name}={text!r}: not a duration (e.g. 80ms, 1.5s)")
    unit = (m.group(2) or "s").lower()
    value = float(m.group(1)) * {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    if value > MAX_DELAY:
        raise ImpairmentError(f"impairment {name}={text!r}: at most {MAX_DELAY:g} s")
    return value


def size(name: str, text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ImpairmentError(
            f"impairment {name}={text!r}: not a byte count (e.g. 1500, 64KiB, 1MB)"
        )
    prefix = m.group(2).lower()
    scale = _BINARY[prefix] if m.group(3) or (prefix and not m.group(4)) else _UNITS[prefix]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ImpairmentError(f"impairment {name}={text!r}: must be at least 1 byte")
    return value


def percent(name: str, text: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise ImpairmentError(
            f"impairment {name}={text!r}: not a percentage (e.g. 5 or 2.5%)"
        ) from None
    if not 0 <= value <= 100:
        raise ImpairmentError(f"impairment {name}={text!r}: out of range (0-100)")
    return value / 100


def parse(query: str, scheme: str, url: str) -> Impairments | None:
    """The impairments a listener's query asks for; None when it has no query."""
    if not query:
        return None
    kinds = kind(scheme).impairments
    if kinds is None:
        raise ImpairmentError(f"--bind {url!r}: {scheme}:// listeners take no impairments yet")
    allowed = DATAGRAM if kinds == "datagram" else STREAM
    values: dict[str, object] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ImpairmentError(
            f"--bind {url!r}: malformed query (use name=value&name=value)"
        ) from None
    for name, text in pairs:
        if name not in allowed:
            raise ImpairmentError(
                f"--bind {url!r}: unknown impairment {name!r} for a {kinds} listener "
                f"(use {', '.join(allowed)})"
            )
        if name in values:
            raise ImpairmentError(f"--bind {url!r}: impairment {name!r} given twice")
        if name in ("delay", "jitter"):
            values[name] = duration(name, text)
        elif name == "rate":
            values[name] = float(size(name, text))
        elif name in ("reset-after", "close-after"):
            values[name.replace("-", "_")] = size(name, text)
        elif name in ("drop", "duplicate"):
            values[name] = percent(name, text)
        else:  # seed
            try:
                values["seed"] = int(text)
            except ValueError:
                raise ImpairmentError(f"impairment seed={text!r}: not an integer") from None
    impairments = Impairments(**values)  # type: ignore[arg-type]
    if impairments.reset_after and impairments.close_after:
        raise ImpairmentError(f"--bind {url!r}: reset-after and close-after exclude each other")
    return impairments
