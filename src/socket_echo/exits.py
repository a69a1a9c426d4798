"""Exit codes and the one error line: the server's (0 served and stopped cleanly, 1 could not
start or failed, 2 usage) and the tools' (client, probe, bench, report), the same condition
the same code (README, "Exit codes"). For the tools:

    0  OK           the echo came back as sent; every check passed; no error in the run
    1  FAILED       it did not: bytes wrong or missing, a check failed, errors or mismatches
    2  UNREACHABLE  nothing to measure: no connection or handshake (probe's --quick too)
    2  USAGE        a mistake on the command line or in a file given (click's own code)
    3  SLO_MISSED   bench and report: the run was clean, but an --slo objective was missed
                    (or, report --fail-on-regression, a figure was worse than its --compare base)

A leaf: imports nothing of socket_echo.
"""

from __future__ import annotations

OK, FAILED, UNREACHABLE, USAGE, SLO_MISSED = 0, 1, 2, 2, 3


def error_line(message: str) -> str:
    """The one form every tool's error takes on stderr."""
    return f"socket-echo: error: {message}"


class ToolError(Exception):
    """A tool stops: ``message`` is the one line for the user, ``code`` the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code
