"""What each listener kind (URL scheme) is, in one table: the one place scheme names are told
apart. uvicorn resolves its protocol names once in ``Config.load()``; here every module asks
:func:`kind` and reads a field, so adding a kind touches this table and the module serving it.

A leaf: it imports nothing of socket_echo (tests/test_imports.py holds that).
"""

from __future__ import annotations

import dataclasses

# How a kind is served (server.py dispatches on this): stream listeners go through the
# engine or the Protocol path (tcp/, gates/wiring.py), the others each have their own server.
STREAM, UDP, QUIC, DTLS = "stream", "udp", "quic", "dtls"

DEFAULT_PORT = 4242  # the Zephyr sample's port (config.py re-exports it)


@dataclasses.dataclass(frozen=True)
class ListenerKind:
    scheme: str  # as written in --bind and TARGET: tcp://, tls+proxy://, ...
    name: str  # as the server's "listening" line says it
    served_by: str  # STREAM, UDP, QUIC or DTLS
    datagram: bool = False  # a UDP socket (one per address), else a stream socket
    unix: bool = False  # a path in the file system, not a host and port
    tls: bool = False  # needs --tls-cert/--tls-key (or --tls-self-signed) for TLS over TCP
    secure: bool = False  # needs credentials of any kind (TLS, QUIC, DTLS)
    proxy: bool = False  # a PROXY protocol header comes first
    impairments: str | None = None  # "stream", "datagram", or None: no ?delay=... query
    engine: bool = False  # the TCP data path (native, epoll) may take it when unimpaired
    tools_reach: bool = True  # client, probe and bench can reach it (a TARGET)
    groups: bool = False  # a multicast group as a listener and a target (groups.py)
    default_port: int = DEFAULT_PORT  # the tools' port when TARGET gives none

    def takes_engine(self, impaired: bool) -> bool:
        """The one rule: a plain TCP or Unix listener without impairments goes to the
        engine; everything else (TLS, PROXY, impairments) to the Protocol path."""
        return self.engine and not impaired


KINDS: dict[str, ListenerKind] = {
    k.scheme: k
    for k in (
        ListenerKind("tcp", "TCP", STREAM, impairments="stream", engine=True),
        ListenerKind("udp", "UDP", UDP, datagram=True, impairments="datagram", groups=True),
        ListenerKind("tls", "TLS", STREAM, tls=True, secure=True, impairments="stream"),
        ListenerKind("unix", "Unix-socket", STREAM, unix=True, impairments="stream", engine=True),
        ListenerKind(
            "tcp+proxy",
            "TCP (PROXY protocol)",
            STREAM,
            proxy=True,
            impairments="stream",
            tools_reach=False,
        ),
        ListenerKind(
            "tls+proxy",
            "TLS (PROXY protocol)",
            STREAM,
            tls=True,
            secure=True,
            proxy=True,
            impairments="stream",
            tools_reach=False,
        ),
        # Zephyr's QUIC echo samples (and net-tools' quic-echo-server) use port 4422.
        ListenerKind("quic", "QUIC", QUIC, datagram=True, secure=True, default_port=4422),
        ListenerKind("dtls", "DTLS 1.2", DTLS, datagram=True, secure=True),
    )
}
SCHEMES = tuple(KINDS)
TARGET_SCHEMES = tuple(s for s, k in KINDS.items() if k.tools_reach)


def kind(scheme: str) -> ListenerKind:
    """The kind of a scheme already checked against :data:`SCHEMES` (KeyError otherwise)."""
    return KINDS[scheme]
