"""``socket-echo report``: bench results added (the --json files of the segments of one run, or
of several runs of one load), shown as one run's are; the exit code as bench's."""

from __future__ import annotations

from socket_echo.exits import FAILED, OK, USAGE, ToolError
from socket_echo.tools.bench import output
from socket_echo.tools.bench.merge import coverage_note, merge
from socket_echo.tools.bench.result import ResultError
from socket_echo.tools.bench.result_file import load


def run(paths: list[str], outputs: output.Outputs) -> int:
    try:
        merged = merge([(path, load(path)) for path in paths])
    except ResultError as exc:
        raise ToolError(str(exc), USAGE) from None
    try:
        output.show(merged, outputs, coverage_note(merged))
    except OSError as exc:
        raise ToolError(f"cannot write results: {exc.strerror or exc}") from None
    return FAILED if merged.failed else OK
