"""``socket-echo report``: bench results added (the --json files of the segments of one run, or
of several runs of one load), shown as one run's are; the exit code as bench's."""

from __future__ import annotations

from socket_echo.exits import OK, SLO_MISSED, USAGE, ToolError
from socket_echo.tools.bench import compare, output
from socket_echo.tools.bench.merge import coverage_note, merge
from socket_echo.tools.bench.result import ResultError
from socket_echo.tools.bench.result_file import load
from socket_echo.tools.bench.run import verdict
from socket_echo.tools.bench.slo import Objective
from socket_echo.tools.defaults import MIN_EFFECT


def run(
    paths: list[str],
    outputs: output.Outputs,
    objectives: tuple[Objective, ...] = (),
    base_paths: tuple[str, ...] = (),
    min_effect: float = MIN_EFFECT,
    fail_on_regression: bool = False,
) -> int:
    """The objectives are judged on the merge: percentiles of the exactly added histograms.
    With ``base_paths`` (--compare), the merge of those is the base of an A/B verdict
    (compare.py); with ``fail_on_regression`` a worse figure exits SLO_MISSED."""
    try:
        results = [(path, load(path)) for path in paths]
        merged = merge(results)
        comparison = None
        if base_paths:
            base = compare.runs_of([(path, load(path)) for path in base_paths])
            comparison = compare.compare(base, compare.runs_of(results), min_effect)
    except ResultError as exc:
        raise ToolError(str(exc), USAGE) from None
    code = verdict(merged, outputs, objectives, coverage_note(merged), comparison, results)
    if code == OK and fail_on_regression and comparison is not None and comparison.regressed:
        return SLO_MISSED
    return code
