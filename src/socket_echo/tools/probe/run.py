"""``socket-echo probe``: the conformance check of any echo server, by the target's kind:
probe/stream.py (TCP, TLS, Unix, UDP), probe/quic.py, probe/dtls.py; the output is
probe/output.py's."""

from __future__ import annotations

from socket_echo.exits import FAILED, OK, UNREACHABLE, ToolError
from socket_echo.tools.connect.target import Target, TlsOptions, Unreachable
from socket_echo.tools.probe.steps import FAIL


def main(
    target: Target,
    timeout: float,
    tls: TlsOptions | None,
    alpn: str,
    quick: bool = False,
    require_concurrency: bool = False,
    as_json: bool = False,
    expect_responders: int = 0,
) -> int:
    """``socket-echo probe`` on any target: prints the report (none with ``quick``) and
    returns the exit code (exits.py); ToolError when nothing answers."""
    from socket_echo.tools.probe import output

    try:
        if target.group is not None:  # a multicast group: every member answers
            from socket_echo.tools.probe import group

            steps = group.run(target, timeout, expect_responders)
            if quick:
                return FAILED if any(s.status == FAIL for s in steps) else OK
        elif target.scheme == "quic":
            from socket_echo.tools.probe import quic

            steps = quic.run(target, timeout, tls, alpn, quick)
        elif target.scheme == "dtls":
            from socket_echo.tools.probe import dtls

            steps = dtls.run(target, timeout, tls, quick)
        else:
            from socket_echo.tools.probe.stream import Probe, run

            if quick:
                return OK if Probe(target, timeout, tls).quick() else FAILED
            steps = run(target, timeout, tls, require_concurrency)
    except Unreachable as exc:
        raise ToolError(f"unreachable: {exc}", UNREACHABLE) from None
    if as_json and not quick:
        print(output.probe_json(target.url, steps))
    elif not quick:
        output.probe_table(target.url, steps)
    return FAILED if any(s.status == FAIL for s in steps) else OK
