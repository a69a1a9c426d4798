"""What the kernel knows about a TCP peer, from ``getsockopt(TCP_INFO)`` on the tool's own
socket: no capture, no root. The one place the layout of Linux's ``struct tcp_info``
(``include/uapi/linux/tcp.h``) is written, with the kernel version each field needs; an older
kernel returns a shorter struct, so a field past its length is missing, and said to be.

A board's developer reads here what a packet capture would show: the MSS each way, window
scaling, SACK, timestamps, ECN, the peer's advertised window, retransmissions and RTOs, and the
kernel's smoothed RTT beside the application's round trip.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

TCP_INFO = getattr(socket, "TCP_INFO", 11)
BUFFER = 512  # larger than any kernel's struct so far: the kernel says how much it filled

# name: (offset, struct format, the kernel that has it)
FIELDS: dict[str, tuple[int, str, str]] = {
    "state": (0, "B", "2.6"),
    "retransmits": (2, "B", "2.6"),  # of the segment at the head, now
    "probes": (3, "B", "2.6"),  # zero-window (or keepalive) probes unanswered, now
    "backoff": (4, "B", "2.6"),
    "options": (5, "B", "2.6"),  # TCPI_OPT_*: what the handshake agreed
    "wscale": (6, "B", "2.6"),  # low nibble: the peer's (snd), high: ours (rcv)
    "rto_us": (8, "I", "2.6"),
    "snd_mss": (16, "I", "2.6"),  # what this side sends per segment (the peer's MSS, less)
    "rcv_mss": (20, "I", "2.6"),  # the peer's segments, as seen
    "unacked": (24, "I", "2.6"),
    "lost": (32, "I", "2.6"),
    "retrans": (36, "I", "2.6"),
    "pmtu": (60, "I", "2.6"),
    "rtt_us": (68, "I", "2.6"),  # smoothed
    "rttvar_us": (72, "I", "2.6"),
    "snd_cwnd": (80, "I", "2.6"),
    "advmss": (84, "I", "2.6"),  # what this side advertised
    "reordering": (88, "I", "2.6"),
    "total_retrans": (100, "I", "2.6.33"),
    "bytes_acked": (120, "Q", "4.1"),
    "bytes_received": (128, "Q", "4.1"),
    "segs_out": (136, "I", "4.2"),
    "segs_in": (140, "I", "4.2"),
    "min_rtt_us": (148, "I", "4.6"),
    "delivery_rate": (160, "Q", "4.9"),  # bytes/s
    "bytes_retrans": (208, "Q", "4.19"),
    "snd_wnd": (228, "I", "5.4"),  # the peer's advertised window, scaled
    "rcv_wnd": (232, "I", "6.2"),
    "total_rto": (240, "H", "6.7"),
}
OPT_TIMESTAMPS, OPT_SACK, OPT_WSCALE, OPT_ECN = 1, 2, 4, 8


def read(sock: socket.socket) -> tuple[dict[str, int], list[str]]:
    """The fields this kernel filled, and the names of those it did not (too old); empty
    and every name where there is no TCP_INFO (not Linux, not TCP)."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_STREAM:
        return {}, list(FIELDS)
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, BUFFER)
    except OSError:
        return {}, list(FIELDS)
    got: dict[str, int] = {}
    missing = []
    for name, (offset, fmt, _) in FIELDS.items():
        end = offset + struct.calcsize(fmt)
        if end <= len(raw):
            got[name] = struct.unpack_from(fmt, raw, offset)[0]
        else:
            missing.append(name)
    return got, missing


def describe(info: dict[str, int], missing: list[str]) -> tuple[str, dict[str, Any]]:
    """One line and the JSON fields of what the handshake agreed and what the connection saw."""
    if not info:
        return "no TCP_INFO here (not Linux, or not TCP)", {}
    options = info["options"]
    wscale = info["wscale"]
    on = {
        "sack": bool(options & OPT_SACK),
        "timestamps": bool(options & OPT_TIMESTAMPS),
        "window_scaling": bool(options & OPT_WSCALE),
        "ecn": bool(options & OPT_ECN),
    }
    data: dict[str, Any] = {
        "mss_out": info["snd_mss"],
        "mss_in": info["rcv_mss"],
        "peer_window_scale": wscale & 0xF if on["window_scaling"] else None,
        "our_window_scale": wscale >> 4 if on["window_scaling"] else None,
        **on,
        "peer_window": info.get("snd_wnd"),
        "retransmitted_segments": info.get("total_retrans", info["retrans"]),
        "rtos": info.get("total_rto"),
        "kernel_rtt_us": info["rtt_us"],
        "kernel_rttvar_us": info["rttvar_us"],
        "path_mtu": info["pmtu"],
        "missing_fields": missing,
    }
    flags = ", ".join(f"{k.replace('_', ' ')} {'on' if v else 'off'}" for k, v in on.items())
    scale = (
        f"window scale {data['peer_window_scale']} (peer) / {data['our_window_scale']} (ours)"
        if on["window_scaling"]
        else "no window scaling"
    )
    window = (
        f"peer window {data['peer_window']:,} B"
        if data["peer_window"] is not None
        else "peer window not told by this kernel (needs 5.4)"
    )
    rtos = f", {data['rtos']} RTO(s)" if data["rtos"] is not None else ""
    line = (
        f"MSS {data['mss_out']} out / {data['mss_in']} in, {scale}, {flags}; {window}; "
        f"{data['retransmitted_segments']} retransmitted segment(s){rtos}; kernel RTT "
        f"{info['rtt_us'] / 1000:.2f} ms ± {info['rttvar_us'] / 1000:.2f}"
    )
    return line, data
