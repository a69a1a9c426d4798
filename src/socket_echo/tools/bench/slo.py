"""Service-level objectives (``--slo EXPR`` on bench and report): a figure, a comparison, a
value: ``p99<2ms``, ``p50<=500us``, ``p99.9<10ms``, ``errors==0``, ``mismatches==0``,
``rps>=20000``, ``late_sends<1%``, ``responders>=3``. Parsed before any load starts (a malformed
one is one line, exit 2) and judged on the result: on ``report`` that is the exactly merged
histograms, the figure k6 cannot give across instances (k6-operator#189). A missed objective
has its own exit code (exits.SLO_MISSED): it is not "the echo was wrong".

A scope after ``@`` judges the objective on each part instead of the whole, and it holds only
when every part meets it: ``p99<2ms@responder`` (each member of a multicast group: its own
spectrum; ``lost_datagrams`` is its own losses) and ``p99<2ms@segment`` (each result given to
``report``, before they are added; a bench run is its one segment). The verdict's measured
value is the worst part's, and it names the parts that missed."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

from socket_echo.config import ConfigError
from socket_echo.tools.bench.result import BenchResult, Responder

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
COUNTS = ("errors", "mismatches", "lost_datagrams", "resets_sent", "responders")
SHARES = ("late_sends", "held_sends")  # of the sends, in percent
SCOPES = ("responder", "segment")
RESPONDER_FIGURES = (*PERCENTILE.values(), "lost_datagrams")  # what a member has of its own
_EXPR = re.compile(
    r"\s*([a-z_][a-z_0-9.]*)\s*(<=|>=|==|<|>)\s*([0-9.eE+-]+)\s*(us|µs|ms|s|%)?\s*"
    r"(?:@\s*([a-z]+))?\s*$"
)


@dataclasses.dataclass(frozen=True)
class Objective:
    text: str  # as given
    figure: str  # a spectrum key, a count, rps or a share
    op: str
    value: float  # latency in us, a share in percent
    scope: str = ""  # "": the whole; "responder", "segment": each part

    def measure(self, r: BenchResult) -> float | None:
        if self.figure in PERCENTILE.values():
            v = r.latency_us[self.figure]
            return None if v is None else float(v)
        if self.figure == "rps":
            return r.requests_per_second
        if self.figure == "responders":
            return float(len(r.responders))
        if self.figure in SHARES:
            return 100.0 * getattr(r, self.figure) / r.sends if r.sends else 0.0
        return float(getattr(r, self.figure))

    def measure_member(self, m: Responder) -> float | None:
        if self.figure == "lost_datagrams":
            return float(m.lost)
        v = m.latency_us[self.figure]
        return None if v is None else float(v)

    def judge(self, r: BenchResult, segments: Sequence[tuple[str, BenchResult]] = ()) -> Verdict:
        """On the whole, or on each part of the scope (``segments``: report's results, each
        with its name; a bench run is its own one segment)."""
        if not self.scope:
            measured = self.measure(r)
            passed = measured is not None and OPS[self.op](measured, self.value)
            return Verdict(self.text, measured, passed)
        if self.scope == "responder":
            parts = [(m.address, self.measure_member(m)) for m in r.responders]
        else:
            parts = [(name, self.measure(s)) for name, s in (segments or [("the run", r)])]
        missed = tuple(n for n, v in parts if v is None or not OPS[self.op](v, self.value))
        values = [v for _, v in parts if v is not None]
        worst = (max if self.op in ("<", "<=", "==") else min)(values) if values else None
        return Verdict(self.text, worst, bool(parts) and not missed, missed)


@dataclasses.dataclass(frozen=True)
class Verdict:
    objective: str
    measured: float | None  # None: nothing was measured (no answer at all); a scope: the worst
    passed: bool
    missed_by: tuple[str, ...] = ()  # a scope: the parts that missed it

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "objective": self.objective,
            "measured": self.measured,
            "passed": self.passed,
        }
        if self.missed_by:
            out["missed_by"] = list(self.missed_by)
        return out

    def line(self, unit: str) -> str:
        shown = "nothing measured" if self.measured is None else f"{self.measured:,.6g}{unit}"
        by = f" (missed by {', '.join(self.missed_by)})" if self.missed_by else ""
        return f"slo {self.objective}: {shown}: {'pass' if self.passed else 'MISSED'}{by}"


def parse(text: str) -> Objective:
    """One objective; ConfigError (one line) naming what is wrong."""
    m = _EXPR.match(text)
    if not m:
        raise ConfigError(
            f"--slo {text!r}: give FIGURE OP VALUE, e.g. p99<2ms, errors==0, rps>=20000, "
            "late_sends<1%"
        )
    name, op, number, unit, scope = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
    scope = scope or ""
    if scope and scope not in SCOPES:
        raise ConfigError(f"--slo {text!r}: @{scope} is no scope (use @responder or @segment)")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"--slo {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--slo {text!r}: {number!r} is not a finite number")
    if name in PERCENTILE:
        if unit not in LATENCY_UNITS:
            raise ConfigError(f"--slo {text!r}: a latency needs a unit: us, ms or s")
        return scoped(Objective(text, PERCENTILE[name], op, value * LATENCY_UNITS[unit], scope))
    if name in SHARES:
        if unit != "%":
            raise ConfigError(f"--slo {text!r}: {name} is a share of the sends: give it in %")
        return scoped(Objective(text, name, op, value, scope))
    if name in (*COUNTS, "rps"):
        if unit is not None:
            raise ConfigError(f"--slo {text!r}: {name} takes no unit")
        return scoped(Objective(text, name, op, value, scope))
    known = ", ".join([*PERCENTILE, *COUNTS, "rps", *SHARES])
    raise ConfigError(f"--slo {text!r}: {name!r} is not a figure (use {known})")


def for_run(objectives: tuple[Objective, ...], group: bool) -> tuple[Objective, ...]:
    """The objectives of a bench run, checked against its target before any load: a scope the
    run cannot have is one line (ConfigError), not a miss found after the run."""
    for o in objectives:
        if o.scope == "responder" and not group:
            raise ConfigError(f"--slo {o.text!r}: @responder is for a multicast group target")
    return objectives


def scoped(o: Objective) -> Objective:
    """A responder's scope takes only what a member has of its own."""
    if o.scope == "responder" and o.figure not in RESPONDER_FIGURES:
        raise ConfigError(
            f"--slo {o.text!r}: a responder has latency figures and lost_datagrams of its own, "
            f"not {o.figure}"
        )
    return o


def unit_of(objective: Objective) -> str:
    if objective.figure in PERCENTILE.values():
        return " µs"
    return "%" if objective.figure in SHARES else ""


def judge(
    objectives: tuple[Objective, ...],
    r: BenchResult,
    segments: Sequence[tuple[str, BenchResult]] = (),
) -> list[Verdict]:
    return [o.judge(r, segments) for o in objectives]
