"""A/B verdicts: ``socket-echo report NEW... --compare BASE...``. Is the new build slower, or is it
noise?

Per figure (requests/s; p50, p90, p99, p99.9; errors) the ratio new/base, a confidence interval
for it, and a verdict: better, worse, or no significant difference. A difference counts only
when the interval excludes 1 and the ratio is at least ``min_effect`` away from 1 (5 % by
default: a real but small change is not called a regression).

The method, and why: both sides carry a histogram per second (``per_second``), so the interval
comes from a bootstrap over whole seconds (a block bootstrap: a second keeps its requests and
their latencies together, so what varies within a run, the load's and the machine's slow
moments, is in the resampling). A side of several runs (several files; the segments of one
distributed run count as one run) is resampled in two stages, runs and then seconds within each
run drawn (the hierarchical bootstrap), so what varies from run to run is in the interval too.
Each of ``RESAMPLES`` rounds draws each side so, adds the drawn seconds' histograms and takes
the figure of the sum; the interval is the 2.5th and 97.5th percentile of new/base over the
rounds (Efron's percentile interval). A bootstrap over two or three runs underestimates how much
runs differ, so with two or more runs a side the interval is widened to Welch's (Student's t on
the logs of each run's figure, Welch-Satterthwaite degrees of freedom) where that is wider. The
percentiles of a resample are exact on the histograms' buckets (the seconds' cumulative counts
on one grid of bucket values, a binary search per percentile), not an average of per-second
percentiles, which would be wrong. Errors are not kept per second: their rate ratio gets the
conditional binomial interval (given the errors of both sides, the new side's share is binomial;
Wilson's interval for that share).

What one run a side cannot see: a run-to-run difference of the machine (a VM's fast and slow
states last minutes) is not in either run's seconds; several runs a side let it in. The
resampling is seeded: the same files, the same verdict. Pure Python: no numpy among the
dependencies, and a few hundred thousand additions a round are enough (seconds beyond
``MAX_BLOCKS`` are grouped into blocks of several)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any, TextIO

from socket_echo.tools.bench.histograms import decode, iterate
from socket_echo.tools.bench.result import BenchResult, ResultError
from socket_echo.tools.defaults import MIN_EFFECT

RESAMPLES = 1000
CONFIDENCE = 0.95
MAX_BLOCKS = 600  # more seconds than this are grouped into consecutive blocks
SEED = 862  # RFC 862: the resampling is the same for the same files
LATENCY = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
BETTER, WORSE, SAME, NONE = "better", "worse", "no significant difference", "not comparable"


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    base: float | None
    new: float | None
    ratio: float | None  # new / base
    low: float | None  # the interval for the ratio
    high: float | None
    verdict: str
    higher_is_better: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
    figures: tuple[Figure, ...]
    min_effect: float
    base_seconds: int
    new_seconds: int
    base_runs: int
    new_runs: int
    base: BenchResult | None = dataclasses.field(default=None, repr=False)  # for the plot

    @property
    def regressed(self) -> bool:
        return any(f.verdict == WORSE for f in self.figures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": f"bootstrap over whole seconds, {RESAMPLES} resamples, "
            f"{CONFIDENCE:.0%} percentile interval",
            "min_effect": self.min_effect,
            "base_seconds": self.base_seconds,
            "new_seconds": self.new_seconds,
            "base_runs": self.base_runs,
            "new_runs": self.new_runs,
            "figures": [f.to_dict() for f in self.figures],
            "regressed": self.regressed,
        }


class _Side:
    """One side's seconds, run by run: requests, the time they cover, and cumulative bucket
    counts on the common grid."""

    def __init__(self, runs: list[list[tuple[int, float, dict[int, int]]]]) -> None:
        self.blocks = [b for run in runs for b in run]  # (requests, covered s, {bucket: count})
        self.runs: list[tuple[int, int]] = []  # (first block, blocks) of each run
        first = 0
        for run in runs:
            self.runs.append((first, len(run)))
            first += len(run)
        self.cumulative: list[list[int]] = []
        self.totals: list[int] = []

    def only(self, run: int) -> list[int]:
        """The weights of one run's seconds, each once."""
        first, n = self.runs[run]
        weights = [0] * len(self.blocks)
        weights[first : first + n] = [1] * n
        return weights

    def draw(self, rng: random.Random) -> list[int]:
        """How many times each block is drawn: as many runs as there are, with replacement,
        and from each run drawn as many of its seconds, with replacement."""
        weights = [0] * len(self.blocks)
        for _ in self.runs:
            first, n = self.runs[rng.randrange(len(self.runs))]
            for _ in range(n):
                weights[first + rng.randrange(n)] += 1
        return weights

    def on_grid(self, grid: list[int]) -> None:
        index = {v: i for i, v in enumerate(grid)}
        for _, _, counts in self.blocks:
            row = [0] * len(grid)
            for value, n in counts.items():
                row[index[value]] += n
            running = 0
            for i, n in enumerate(row):
                running += n
                row[i] = running
            self.cumulative.append(row)
            self.totals.append(running)

    def requests_per_second(self, weights: Sequence[int]) -> float:
        """Requests over the time the drawn seconds cover (the window's first and last second
        may be partial: as whole seconds they would pull the rate down at random)."""
        pairs = list(zip(weights, self.blocks, strict=True))
        time = sum(w * t for w, (_, t, _) in pairs)
        return sum(w * r for w, (r, _, _) in pairs) / time if time else 0.0

    def percentile(self, grid: list[int], weights: Sequence[int], q: float) -> float | None:
        """HdrHistogram's value at percentile q of the sum of the seconds drawn ``weights``
        times each: the lowest bucket whose cumulative count reaches q % of the total."""
        chosen = [(w, row) for w, row in zip(weights, self.cumulative, strict=True) if w]
        total = sum(w * row[-1] for w, row in chosen) if chosen and grid else 0
        if not total:
            return None
        rank = max(1, math.ceil(q / 100 * total))
        lo, hi = 0, len(grid) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(w * row[mid] for w, row in chosen) >= rank:
                hi = mid
            else:
                lo = mid + 1
        return float(grid[lo])


def _blocks(result: BenchResult, where: str) -> list[tuple[int, float, dict[int, int]]]:
    """The seconds (in blocks of several past MAX_BLOCKS) with the time each covers of the
    run's window."""
    seconds = sorted(result.per_second, key=lambda s: s.t)
    if not seconds:
        raise ResultError(f"{where}: no per-second histograms to compare")
    start, end = result.window.start, result.window.end
    size = math.ceil(len(seconds) / MAX_BLOCKS)
    blocks: list[tuple[int, float, dict[int, int]]] = []
    for first in range(0, len(seconds), size):
        requests, covered, counts = 0, 0.0, dict[int, int]()
        for s in seconds[first : first + size]:
            requests += s.requests
            covered += max(0.0, min(s.t + 1, end) - max(s.t, start))
            for value, n in iterate(decode(s.histogram, f"{where}: second {s.t:.0f}")):
                counts[value] = counts.get(value, 0) + n
        if not covered and blocks:  # answers read after the window (the drain): the last second's
            last_requests, last_covered, last_counts = blocks.pop()
            for value, n in counts.items():
                last_counts[value] = last_counts.get(value, 0) + n
            requests, covered, counts = last_requests + requests, last_covered, last_counts
        blocks.append((requests, covered, counts))
    return blocks


def runs_of(results: Sequence[tuple[str, BenchResult]]) -> list[BenchResult]:
    """Each file a run, except the segments of one distributed run (one division, one start),
    which are added into the run they are parts of."""
    from socket_echo.tools.bench.merge import merge

    singles: list[BenchResult] = []
    segments: dict[tuple[int, int], list[tuple[str, BenchResult]]] = {}
    for path, r in results:
        if r.segment.count > 1:
            segments.setdefault((r.segment.count, round(r.window.start)), []).append((path, r))
        else:
            singles.append(r)
    return singles + [merge(parts) for parts in segments.values()]


def _interval(ratios: list[float]) -> tuple[float, float]:
    ratios.sort()
    tail = (1 - CONFIDENCE) / 2
    low = ratios[min(len(ratios) - 1, int(tail * len(ratios)))]
    high = ratios[min(len(ratios) - 1, int((1 - tail) * len(ratios)))]
    return low, high


# Student's t at 97.5 % for 1..30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def _welch(base: Sequence[float | None], new: Sequence[float | None]) -> float | None:
    """With at least two runs a side: the factor f such that [ratio / f, ratio * f] is the
    95 % Welch interval of the ratio of the runs' geometric means (logs of each run's
    figure; degrees of freedom by Welch-Satterthwaite, rounded down: the wider t). A
    bootstrap over two or three runs is too narrow; this is the small-sample correction."""
    xs = [math.log(v) for v in base if v]
    ys = [math.log(v) for v in new if v]
    if len(xs) < 2 or len(ys) < 2:
        return None

    def var(v: list[float]) -> float:
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / (len(v) - 1)

    ex, ey = var(xs) / len(xs), var(ys) / len(ys)
    if ex + ey == 0:
        return 1.0
    df = (ex + ey) ** 2 / (ex**2 / (len(xs) - 1) + ey**2 / (len(ys) - 1))
    t = T975[min(len(T975), max(1, math.floor(df))) - 1] if df < 31 else 1.96
    return math.exp(t * math.sqrt(ex + ey))


def judge(
    ratio: float | None,
    low: float | None,
    high: float | None,
    min_effect: float,
    higher_is_better: bool,
) -> str:
    """better / worse / no significant difference: the interval must exclude 1 and the
    ratio be at least ``min_effect`` from it."""
    if ratio is None or low is None or high is None:
        return NONE
    if low <= 1 <= high or abs(ratio - 1) < min_effect:
        return SAME
    up = low > 1
    return BETTER if up == higher_is_better else WORSE


def _errors(base: Sequence[BenchResult], new: Sequence[BenchResult], min_effect: float) -> Figure:
    """The error rate's ratio with the conditional binomial interval (Wilson's, z for
    CONFIDENCE) on the new side's share of all errors."""
    eb = sum(r.errors + r.mismatches for r in base)
    en = sum(r.errors + r.mismatches for r in new)
    nb, nn = max(1, sum(r.requests for r in base)), max(1, sum(r.requests for r in new))
    if eb + en == 0:
        return Figure("errors", 0, 0, 1.0, 1.0, 1.0, SAME)
    z = 1.959963984540054  # the normal quantile for 95 %
    total = eb + en
    share = en / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    half /= 1 + z * z / total

    def ratio_of(p: float) -> float:
        return math.inf if p >= 1 else (p / (1 - p)) * (nb / nn)

    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    ratio = ratio_of(share)
    return Figure(
        "errors", eb, en, ratio, ratio_of(lo), ratio_of(hi),
        judge(ratio, ratio_of(lo), ratio_of(hi), min_effect, False),
    )  # fmt: skip


def compare(
    base_runs: Sequence[BenchResult],
    new_runs: Sequence[BenchResult],
    min_effect: float = MIN_EFFECT,
    resamples: int = RESAMPLES,
) -> Comparison:
    """The verdict per figure, each side one or more runs (runs_of); ResultError when a side
    has no seconds to resample or the two are not the same load (the target may differ:
    that is often the point)."""
    base = base_runs[0]
    for r in [*base_runs, *new_runs]:
        if r.mode != base.mode or r.parameters.size != base.parameters.size:
            raise ResultError(
                f"the base is {base.mode} at {base.parameters.size} B, a run compared is "
                f"{r.mode} at {r.parameters.size} B: not the same load"
            )
    a = _Side([_blocks(r, "the base") for r in base_runs])
    b = _Side([_blocks(r, "the new side") for r in new_runs])
    grid = sorted({v for side in (a, b) for _, _, counts in side.blocks for v in counts})
    a.on_grid(grid)
    b.on_grid(grid)
    rng = random.Random(SEED)
    ones_a, ones_b = [1] * len(a.blocks), [1] * len(b.blocks)
    names = ["requests/s", *(name for name, _ in LATENCY)]

    def values(side: _Side, weights: Sequence[int]) -> list[float | None]:
        return [
            side.requests_per_second(weights),
            *(side.percentile(grid, weights, q) for _, q in LATENCY),
        ]

    def figures(wa: Sequence[int], wb: Sequence[int]) -> list[tuple[float | None, float | None]]:
        return list(zip(values(a, wa), values(b, wb), strict=True))

    point = figures(ones_a, ones_b)
    # each run's own figures, for the between-run interval (Welch's) when both sides have
    # several runs
    runs_a = [values(a, a.only(i)) for i in range(len(a.runs))]
    runs_b = [values(b, b.only(j)) for j in range(len(b.runs))]
    ratios: list[list[float]] = [[] for _ in names]
    for _ in range(resamples):
        wa, wb = a.draw(rng), b.draw(rng)
        for i, (x, y) in enumerate(figures(wa, wb)):
            if x and y is not None:
                ratios[i].append(y / x)
    result = []
    for i, name in enumerate(names):
        x, y = point[i]
        better_up = i == 0
        if not x or y is None or len(ratios[i]) < resamples // 2:
            result.append(Figure(name, x, y, None, None, None, NONE, better_up))
            continue
        low, high = _interval(ratios[i])
        between = _welch([r[i] for r in runs_a], [r[i] for r in runs_b])
        if between is not None:  # the wider of the two: neither variation is left out
            low, high = min(low, y / x / between), max(high, y / x * between)
        ratio = y / x
        verdict = judge(ratio, low, high, min_effect, better_up)
        result.append(Figure(name, x, y, ratio, low, high, verdict, better_up))
    result.append(_errors(base_runs, new_runs, min_effect))
    return Comparison(
        tuple(result),
        min_effect,
        sum(len(r.per_second) for r in base_runs),
        sum(len(r.per_second) for r in new_runs),
        len(base_runs),
        len(new_runs),
        base,
    )


def show(c: Comparison, out: TextIO) -> None:
    print(
        f"A/B: new/base over {c.new_runs} run(s), {c.new_seconds} s, against "
        f"{c.base_runs} run(s), {c.base_seconds} s; {CONFIDENCE:.0%} intervals from "
        f"{RESAMPLES:,} bootstrap resamples of runs and their whole seconds; differences under "
        f"{c.min_effect:.0%} not counted",
        file=out,
    )
    if min(c.base_runs, c.new_runs) < 2:
        print(
            "  note: one run a side: the interval holds each run's own variation, not how runs "
            "differ from one another (a VM's fast and slow phases): give each side several runs",
            file=out,
        )
    print(f"  {'figure':<11} {'base':>12} {'new':>12} {'new/base':>9}  {'interval':<17} verdict",
          file=out)  # fmt: skip
    for f in c.figures:
        unit = "" if f.name in ("requests/s", "errors") else " µs"

        def num(v: float | None, unit: str = unit) -> str:
            return "—" if v is None else f"{v:,.0f}{unit}"

        ratio = "—" if f.ratio is None else f"{f.ratio:.3f}x"
        interval = "—" if f.low is None or f.high is None else f"[{f.low:.3f}, {f.high:.3f}]"
        print(f"  {f.name:<11} {num(f.base):>12} {num(f.new):>12} {ratio:>9}  {interval:<17} "
              f"{f.verdict}", file=out)  # fmt: skip
