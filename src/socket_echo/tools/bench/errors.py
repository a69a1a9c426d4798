"""What bench counts as an error, by kind: the keys of ``error_kinds`` in a result. The C
ping-pong (bench/_native.c) names the same kinds with the same words (its ``E_`` defines; a
test holds them equal), so a run's errors read alike whichever loop ran it."""

from __future__ import annotations

NO_ANSWER = "no answer within the timeout"  # still owed at the end, older than the timeout
NO_COMPLETE_ANSWER = "no complete answer within the timeout"  # the connection is replaced
CLOSED_BY_SERVER = "closed by server"
SEND_FAILED = "send failed"  # a first send on a new connection
REGISTER_FAILED = "register: epoll_ctl failed"
PORT_UNREACHABLE = "port unreachable"  # UDP: ICMP port unreachable came back
NO_REQUEST = "no request was answered"  # the whole run, when nothing else was counted
NEVER_ANSWERED = "connection never answered"  # one of --connections got nothing all run
WORKER_SILENT = "a worker did not report"

# "<what>: <cause>" kinds: the cause is the system's words (strerror)
CONNECT, SEND, RECV, SOCKET, WORKER_FAILED = "connect", "send", "recv", "socket", "worker failed"
HANDSHAKE = "TLS handshake"  # churn over tls://: a handshake of the loop's own failed

# the C twin's name for each kind it counts (bench/_native.c: #define E_... "...")
C_NAMES = {
    "E_NO_COMPLETE_ANSWER": NO_COMPLETE_ANSWER,
    "E_CLOSED_BY_SERVER": CLOSED_BY_SERVER,
    "E_SEND_FAILED": SEND_FAILED,
    "E_REGISTER_FAILED": REGISTER_FAILED,
    "E_SEND": SEND,
    "E_RECV": RECV,
}


def because(what: str, cause: object) -> str:
    """A kind with its cause: ``send: Connection reset by peer``."""
    return f"{what}: {cause}"
