"""tools/connect/tcp_info.py reads Linux's struct tcp_info at the offsets it writes down: held
on a real connection, where the kernel's counts are known (the bytes received, the state, the
options loopback agrees), and on a struct cut short as an older kernel's is."""

from __future__ import annotations

import sys

import pytest
from conftest import exchange

from socket_echo.tools.connect import tcp_info

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's TCP_INFO")


def test_the_fields_are_where_the_kernel_puts_them(shared_server):
    server = shared_server()
    with server.connect() as sock:
        data = bytes(range(256)) * 40
        assert exchange(sock, data) == data
        info, missing = tcp_info.read(sock)
    assert info["state"] == 1  # TCP_ESTABLISHED
    assert info["bytes_received"] == len(data)  # a u64 at 128: the offset is right
    assert info["bytes_acked"] == len(data) + 1  # and at 120 (the SYN counts one)
    assert info["options"] & tcp_info.OPT_SACK and info["options"] & tcp_info.OPT_TIMESTAMPS
    assert 0 < info["rtt_us"] < 1_000_000 and info["snd_mss"] > 0 and info["pmtu"] >= 1280
    assert info["total_retrans"] == 0
    line, fields = tcp_info.describe(info, missing)
    assert "sack on, timestamps on" in line and fields["mss_out"] == info["snd_mss"]


def test_a_shorter_struct_says_which_fields_are_missing(shared_server, monkeypatch):
    """An older kernel fills less: the fields past its length are named missing, not read
    as zeros (snd_wnd, the peer's window, needs 5.4)."""
    server = shared_server()
    monkeypatch.setattr(tcp_info, "BUFFER", 104)  # what 2.6.33 to 4.0 return
    with server.connect() as sock:
        info, missing = tcp_info.read(sock)
    assert "total_retrans" in info and "bytes_acked" not in info
    assert "snd_wnd" in missing and "bytes_received" in missing
    line, fields = tcp_info.describe(info, missing)
    assert "peer window not told by this kernel" in line and fields["peer_window"] is None
