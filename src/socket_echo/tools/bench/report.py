"""``socket-echo report``: bench results added (the --json files of the segments of one run, or
of several runs of one load), shown as one run's are; the exit code as bench's."""

from __future__ import annotations

from socket_echo.exits import USAGE, ToolError
from socket_echo.tools.bench import output
from socket_echo.tools.bench.merge import coverage_note, merge
from socket_echo.tools.bench.result import ResultError
from socket_echo.tools.bench.result_file import load
from socket_echo.tools.bench.run import verdict
from socket_echo.tools.bench.slo import Objective


def run(paths: list[str], outputs: output.Outputs, objectives: tuple[Objective, ...] = ()) -> int:
    """The objectives are judged on the merge: percentiles of the exactly added histograms."""
    try:
        merged = merge([(path, load(path)) for path in paths])
    except ResultError as exc:
        raise ToolError(str(exc), USAGE) from None
    return verdict(merged, outputs, objectives, coverage_note(merged))
