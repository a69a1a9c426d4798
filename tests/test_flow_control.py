"""A client that sends and never reads must not grow the server's memory past --max-buffer."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import psutil
from conftest import is_closed_by_peer, metrics_port, scrape, total

TOTAL = 64 << 20
CHUNK = 1 << 16


def pattern(total: int) -> bytes:
    block = hashlib.sha256(b"socket-echo").digest() * (CHUNK // 32)
    return block * (total // CHUNK)


def test_sender_that_never_reads_is_paused_then_gets_every_byte(start_server, server_flags):
    server = start_server(
        *server_flags, "--idle-timeout", "0", "--max-buffer", "256KiB", "--metrics", "127.0.0.1:0"
    )
    mport = metrics_port(server)
    proc = psutil.Process(server.pid)
    rss_before = proc.memory_info().rss
    data = pattern(TOTAL)
    sent = [0]
    with server.connect(timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

        def send() -> None:
            view = memoryview(data)
            while sent[0] < TOTAL:
                sent[0] += sock.send(view[sent[0] : sent[0] + CHUNK])

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        # Wait until the sender is blocked: the server has stopped reading from us.
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:
            if sent[0] != last:
                last, still_since = sent[0], time.monotonic()
            time.sleep(0.05)
        growth = proc.memory_info().rss - rss_before
        assert sent[0] < TOTAL, "the server kept reading although nobody read its echo"
        assert growth < 16 << 20, f"server RSS grew {growth >> 20} MiB while paused"
        # The metrics tell bytes handed back to the kernel from bytes received: the held
        # echo is counted in, not out (out is never more than in).
        paused = scrape(mport)
        held = total(paused, "socket_echo_bytes_total", direction="in") - total(
            paused, "socket_echo_bytes_total", direction="out"
        )
        assert 0 < held <= (256 << 10) + (256 << 10), held  # --max-buffer + one read

        got = bytearray()
        while len(got) < TOTAL:
            part = sock.recv(1 << 20)
            assert part, "connection closed early"
            got += part
        sender.join(30)
        done = scrape(mport)
        assert total(done, "socket_echo_bytes_total", direction="out") == TOTAL
        assert total(done, "socket_echo_bytes_total", direction="in") == TOTAL
    assert bytes(got) == data


def test_reader_stalled_past_the_idle_timeout_is_closed(start_server, server_flags):
    server = start_server(*server_flags, "--idle-timeout", "1", "--max-buffer", "64KiB")
    stalled = server.connect()
    stalled.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # fill every buffer on the way: the server pauses
        try:
            sent += stalled.send(b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.2)
            try:
                sent += stalled.send(b"x" * 65536)
            except BlockingIOError:
                break
    server.wait_for_log(r"closed: write stalled", timeout=10)
    assert is_closed_by_peer(stalled, timeout=5)
    stalled.close()
    # others are unaffected
    with server.connect() as sock:
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"


def test_a_slow_but_live_reader_is_not_stalled_and_a_stopped_one_is(start_server, server_flags):
    """A client that sends flat out and reads 10 KB/s, with --idle-timeout 1: its echo
    moves, slowly, so it is not reset as "write stalled" (the rule is no progress, not too
    little); once it stops reading altogether it is."""
    server = start_server(*server_flags, "--idle-timeout", "1", "--max-buffer", "16KiB")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.listener("tcp")[2]))
    sock.settimeout(10)
    stop = threading.Event()

    def flood() -> None:
        block = b"s" * 65536
        try:
            while not stop.is_set():
                sock.sendall(block)
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    got = 0
    until = time.monotonic() + 4  # four idle timeouts of reading 1 KiB every 0.1 s
    while time.monotonic() < until:
        part = sock.recv(1024)
        assert part, "the slow reader was closed: " + server.log
        got += len(part)
        time.sleep(0.1)
    assert got >= 20_000
    assert "write stalled" not in server.log
    server.wait_for_log(r"closed: write stalled", timeout=15)  # now it reads nothing
    stop.set()
    sock.close()
