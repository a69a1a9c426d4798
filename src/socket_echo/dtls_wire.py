"""DTLS 1.2 over pyOpenSSL memory BIOs, without I/O: datagrams in; records and datagrams out.

The ``dtls://`` listener (servers/dtls.py) and the tools' DTLS client (tools/connect/dtls.py)
both drive an :class:`Endpoint`; neither touches OpenSSL's state machine otherwise.

Why datagrams are re-cut here: pyOpenSSL offers memory BIOs only (no datagram BIO), and a
memory BIO joins everything OpenSSL writes into one byte string, so the datagram boundaries
of a flight are lost. DTLS records carry their own length (RFC 6347 §4.1), so the output is
split back into records and packed, whole records only, into datagrams of at most the MTU;
an application record is always alone in its datagram, so each echo is one record in one
datagram, as the peer sent it. Input needs no such care: OpenSSL reads a memory BIO one
record at a time.
"""

from __future__ import annotations

import contextlib

from OpenSSL import SSL

RECORD_HEADER = 13  # type, version, epoch, sequence number, length
ALERT, HANDSHAKE, APPLICATION_DATA = 21, 22, 23
CLIENT_HELLO, HELLO_VERIFY_REQUEST = 1, 3
DTLS1_2_VERSION = 0xFEFD
MAX_READ = 1 << 16


def split_records(blob: bytes) -> list[bytes]:
    """The whole records in ``blob`` (a truncated tail is dropped)."""
    out = []
    i, end = 0, len(blob)
    while i + RECORD_HEADER <= end:
        n = RECORD_HEADER + int.from_bytes(blob[i + 11 : i + 13], "big")
        if i + n > end:
            break
        out.append(blob[i : i + n])
        i += n
    return out


def pack(records: list[bytes], mtu: int) -> list[bytes]:
    """Records into as few datagrams of at most ``mtu`` bytes as their order allows; a
    record that is larger on its own, and every application record, goes alone."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        alone = record[0] == APPLICATION_DATA
        if current and (alone or len(current) + len(record) > mtu):
            datagrams.append(current)
            current = b""
        if alone:
            datagrams.append(record)
        else:
            current += record
    if current:
        datagrams.append(current)
    return datagrams


def handshake_type(datagram: bytes) -> int | None:
    """The handshake message type of a datagram's first record if it is a plaintext (epoch 0)
    handshake record, else None."""
    if len(datagram) > RECORD_HEADER and datagram[0] == HANDSHAKE and datagram[3:5] == b"\0\0":
        return datagram[RECORD_HEADER]
    return None


def is_client_hello(datagram: bytes) -> bool:
    return handshake_type(datagram) == CLIENT_HELLO


def hello_random(datagram: bytes) -> bytes:
    """A ClientHello's 32 random bytes (after the record header, the handshake header and
    client_version): they tell a retransmitted ClientHello from a new one."""
    start = RECORD_HEADER + 12 + 2
    return datagram[start : start + 32]


def alert_record(description: int, sequence: int = 1) -> bytes:
    """A plaintext fatal alert (epoch 0): how a server refuses a client it will not serve,
    since OpenSSL has no call that sends one outside a handshake failure."""
    header = bytes([ALERT]) + DTLS1_2_VERSION.to_bytes(2, "big") + b"\0\0"
    return header + sequence.to_bytes(6, "big") + (2).to_bytes(2, "big") + bytes([2, description])


def describe(exc: BaseException) -> str:
    """One line for an OpenSSL error: its reason text(s), lower case."""
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(item[-1]) for item in exc.args[0] if item and item[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons)).lower()
    return str(exc) or type(exc).__name__


class Endpoint:
    """One DTLS association (either side) over memory BIOs.

    ``feed`` a datagram in: it advances the handshake and returns the application records it
    carried, in order. ``outgoing`` is what to send now, cut into datagrams. While the
    handshake runs, ``timeout`` says when ``expire`` must be called (the retransmission timer).
    OpenSSL errors (a fatal alert from the peer, a refused certificate) propagate as
    ``SSL.Error`` after the alert we owe the peer, if any, was queued in ``outgoing``."""

    __slots__ = ("conn", "established", "mtu", "peer_closed")

    def __init__(self, conn: SSL.Connection, mtu: int) -> None:
        self.conn = conn
        self.mtu = mtu
        conn.set_ciphertext_mtu(mtu)
        self.established = False
        self.peer_closed = False  # its close_notify arrived

    def handshake(self) -> bool:
        """Run the handshake as far as the input allows; True once it is complete."""
        if not self.established:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                return False
            self.established = True
        return True

    def feed(self, datagram: bytes) -> list[bytes]:
        self.conn.bio_write(datagram)
        if not self.handshake():
            return []
        records = []
        while True:
            try:
                records.append(self.conn.recv(MAX_READ))
            except SSL.WantReadError:
                return records
            except SSL.ZeroReturnError:
                self.peer_closed = True
                return records

    def send(self, record: bytes) -> None:
        """One application record (sent by the next ``outgoing``)."""
        self.conn.send(record)

    def outgoing(self) -> list[bytes]:
        blob = b""
        while True:
            try:
                blob += self.conn.bio_read(MAX_READ)
            except SSL.WantReadError:
                break
        return pack(split_records(blob), self.mtu) if blob else []

    def timeout(self) -> float | None:
        """Seconds until the handshake's retransmission timer fires, or None."""
        return None if self.established else self.conn.DTLSv1_get_timeout()

    def expire(self) -> None:
        """The retransmission timer fired: the last flight is queued again."""
        self.conn.DTLSv1_handle_timeout()

    def close_notify(self) -> None:
        """Queue a close_notify alert (nothing if the handshake never finished)."""
        if self.established:
            with contextlib.suppress(SSL.Error):
                self.conn.shutdown()
