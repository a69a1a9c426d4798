"""Service-level objectives (``--slo EXPR`` on bench and report): a figure, a comparison, a
value: ``p99<2ms``, ``p50<=500us``, ``p99.9<10ms``, ``errors==0``, ``mismatches==0``,
``rps>=20000``, ``late_sends<1%``. Parsed before any load starts (a malformed one is one line,
exit 2) and judged on the result: on ``report`` that is the exactly merged histograms, the
figure k6 cannot give across instances (k6-operator#189). A missed objective has its own exit
code (exits.SLO_MISSED): it is not "the echo was wrong"."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from socket_echo.config import ConfigError
from socket_echo.tools.bench.result import BenchResult

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt,
}  # fmt: skip
LATENCY_UNITS = {"us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6}
# latency figures: the spectrum's keys, as users write them
PERCENTILE = {
    "p50": "p50", "p75": "p75", "p90": "p90", "p95": "p95", "p99": "p99", "p99.9": "p999",
    "p999": "p999", "p99.99": "p9999", "p9999": "p9999", "p99.999": "p99999",
    "p99999": "p99999", "max": "max", "min": "min", "mean": "mean",
}  # fmt: skip
COUNTS = ("errors", "mismatches", "lost_datagrams", "resets_sent")
SHARES = ("late_sends", "held_sends")  # of the sends, in percent
_EXPR = re.compile(r"\s*([a-z_][a-z_0-9.]*)\s*(<=|>=|==|<|>)\s*([0-9.eE+-]+)\s*(us|µs|ms|s|%)?\s*$")


@dataclasses.dataclass(frozen=True)
class Objective:
    text: str  # as given
    figure: str  # a spectrum key, a count, rps or a share
    op: str
    value: float  # latency in us, a share in percent

    def measure(self, r: BenchResult) -> float | None:
        if self.figure in PERCENTILE.values():
            v = r.latency_us[self.figure]
            return None if v is None else float(v)
        if self.figure == "rps":
            return r.requests_per_second
        if self.figure in SHARES:
            return 100.0 * getattr(r, self.figure) / r.sends if r.sends else 0.0
        return float(getattr(r, self.figure))

    def judge(self, r: BenchResult) -> Verdict:
        measured = self.measure(r)
        passed = measured is not None and OPS[self.op](measured, self.value)
        return Verdict(self.text, measured, passed)


@dataclasses.dataclass(frozen=True)
class Verdict:
    objective: str
    measured: float | None  # None: nothing was measured (no answer at all)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "measured": self.measured, "passed": self.passed}

    def line(self, unit: str) -> str:
        shown = "nothing measured" if self.measured is None else f"{self.measured:,.6g}{unit}"
        return f"slo {self.objective}: {shown}: {'pass' if self.passed else 'MISSED'}"


def parse(text: str) -> Objective:
    """One objective; ConfigError (one line) naming what is wrong."""
    m = _EXPR.match(text)
    if not m:
        raise ConfigError(
            f"--slo {text!r}: give FIGURE OP VALUE, e.g. p99<2ms, errors==0, rps>=20000, "
            "late_sends<1%"
        )
    name, op, number, unit = m.group(1), m.group(2), m.group(3), m.group(4)
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"--slo {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--slo {text!r}: {number!r} is not a finite number")
    if name in PERCENTILE:
        if unit not in LATENCY_UNITS:
            raise ConfigError(f"--slo {text!r}: a latency needs a unit: us, ms or s")
        return Objective(text, PERCENTILE[name], op, value * LATENCY_UNITS[unit])
    if name in SHARES:
        if unit != "%":
            raise ConfigError(f"--slo {text!r}: {name} is a share of the sends: give it in %")
        return Objective(text, name, op, value)
    if name in (*COUNTS, "rps"):
        if unit is not None:
            raise ConfigError(f"--slo {text!r}: {name} takes no unit")
        return Objective(text, name, op, value)
    known = ", ".join([*PERCENTILE, *COUNTS, "rps", *SHARES])
    raise ConfigError(f"--slo {text!r}: {name!r} is not a figure (use {known})")


def unit_of(objective: Objective) -> str:
    if objective.figure in PERCENTILE.values():
        return " µs"
    return "%" if objective.figure in SHARES else ""


def judge(objectives: tuple[Objective, ...], r: BenchResult) -> list[Verdict]:
    return [o.judge(r) for o in objectives]
