"""PROXY protocol v1 and v2 headers (HAProxy's spec), parsed as a pure function over bytes.

Like h11, no I/O: the caller feeds what it has read so far; :func:`parse` answers "need more"
(None), a :class:`ProxyHeader` with how many bytes it used, or raises :class:`ProxyHeaderError`,
and nothing else. It never looks past the header.

Why not the ``proxy-protocol`` package (0.11.3): its v1 parser lets ``ValueError``,
``AddressValueError`` and ``UnicodeDecodeError`` escape instead of its own error and puts no
bound on the v1 line (the spec's is 107 bytes), its v2 parser raises ``struct.error`` when the
length field is shorter than the family's address block, and its reader is tied to asyncio
streams rather than being sans-IO.
"""

from __future__ import annotations

import dataclasses
import ipaddress

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line the spec allows, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 2048  # header plus addresses and TLVs: more is refused as oversized
V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX


# Why a header was refused: the label of socket_echo_proxy_rejected_total.
NOT_PROXY = "no PROXY header"  # the first bytes are not a PROXY header at all
MALFORMED = "malformed header"
OVERSIZED = "oversized header"
TIMEOUT = "header timeout"  # set by the gates, which own the clock
CLOSED_EARLY = "closed before header"  # set by the gates, which see the EOF


class ProxyHeaderError(ValueError):
    """Malformed or oversized header; the message names the cause, ``reason`` its kind."""

    def __init__(self, message: str, reason: str = MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    version: int
    source: tuple[str, int] | None  # None: LOCAL/UNKNOWN, use the connection's own address
    destination: tuple[str, int] | None
    length: int  # bytes the header used; the payload starts right after


def parse(data: bytes) -> ProxyHeader | None:
    """A header at the start of ``data``, None if more bytes are needed, else an error."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyHeaderError("no PROXY protocol header", NOT_PROXY)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header", NOT_PROXY)
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes", OVERSIZED)
        if b"\n" in data:
            raise ProxyHeaderError("v1 header not ended by CRLF")
        return None
    try:
        line = data[len(V1_PREFIX) : end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = line.split(" ")
    if parts[0] == "UNKNOWN":
        return ProxyHeader(1, None, None, end + 2)
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header: expected TCP4|TCP6 SRC DST SPORT DPORT")
    version = 4 if parts[0] == "TCP4" else 6
    source = (_v1_address(parts[1], version), _v1_port(parts[3]))
    destination = (_v1_address(parts[2], version), _v1_port(parts[4]))
    return ProxyHeader(1, source, destination, end + 2)


def _v1_address(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: bad address {text[:45]!r}") from None
    if ip.version != version:
        raise ProxyHeaderError(f"v1 header: {text!r} is not IPv{version}")
    return str(ip)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"v1 header: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header: port {port} out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header", NOT_PROXY)
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 header: version {version}, expected 2")
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"v2 header: unknown command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family > 3 or transport > 2:
        raise ProxyHeaderError("v2 header: unknown address family or transport")
    length = 16 + int.from_bytes(data[14:16], "big")
    if length > V2_MAX:
        raise ProxyHeaderError(
            f"v2 header of {length} bytes is over the {V2_MAX}-byte limit", OVERSIZED
        )
    if len(data) < length:
        return None
    if command == 0x0 or family in (0x0, 0x3):  # LOCAL, UNSPEC, UNIX: keep the real peer
        if family in V2_ADDRESS_SIZES and command == 0x1 and length - 16 < V2_ADDRESS_SIZES[family]:
            raise ProxyHeaderError("v2 header: address block shorter than its family needs")
        return ProxyHeader(2, None, None, length)
    need = V2_ADDRESS_SIZES[family]
    if length - 16 < need:
        raise ProxyHeaderError("v2 header: address block shorter than its family needs")
    block = data[16 : 16 + need]
    size = 4 if family == 0x1 else 16
    src = ipaddress.ip_address(block[:size])
    dst = ipaddress.ip_address(block[size : 2 * size])
    sport = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(2, (str(src), sport), (str(dst), dport), length)


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and tools)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode(
        "ascii"
    )


def build_v2(
    source: tuple[str, int] | None, destination: tuple[str, int] | None = None, tlvs: bytes = b""
) -> bytes:
    """A v2 header (for tests and tools); source None = LOCAL."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    destination = destination or ("0.0.0.0" if ":" not in source[0] else "::", 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x1 if src.version == 4 else 0x2
    block = (
        src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    )
    body = block + tlvs
    return V2_SIGNATURE + bytes([0x21, (family << 4) | 0x1]) + len(body).to_bytes(2, "big") + body
