"""Sizes and names the C extensions and the Python paths share, held equal: each has its owner
in Python (config.py, udp/guard.py, tcp/accept.py) and the C code says the same, or this fails.
READ_CHUNK needs no test: Python passes it to the engine (tcp/native.py)."""

from __future__ import annotations

import errno
import pathlib
import re

from socket_echo import config
from socket_echo.tcp.accept import RESOURCE_ERRORS
from socket_echo.udp.guard import REASONS

PACKAGE = pathlib.Path(config.__file__).parent
TCP_C = (PACKAGE / "tcp" / "engine.h").read_text() + (PACKAGE / "tcp" / "engine.c").read_text()
UDP_C = (PACKAGE / "udp" / "_native.c").read_text()


def define(source: str, name: str) -> int:
    match = re.search(rf"^#define {name} (\d+)\b", source, re.M)
    assert match, f"#define {name} not found"
    return int(match.group(1))


def test_the_accept_batch_is_the_same_in_c_and_python():
    assert define(TCP_C, "ACCEPT_BATCH") == config.ACCEPT_BATCH


def test_the_udp_batch_is_the_same_in_c_and_python():
    assert define(UDP_C, "SLOTS") == config.UDP_BATCH


def test_the_accept_errors_that_pause_accepting_are_the_same_in_c_and_python():
    line = next(ln for ln in TCP_C.splitlines() if "errno == EMFILE" in ln)
    names = set(re.findall(r"errno == (E[A-Z]+)", line))
    assert {getattr(errno, n) for n in names} == set(RESOURCE_ERRORS)


def test_udp_drop_reasons_are_named_the_same_in_c_and_python():
    array = re.search(r"REASONS\[D_COUNT\] = \{(.*?)\};", UDP_C, re.S)
    assert array
    assert tuple(re.findall(r'"([^"]+)"', array.group(1))) == REASONS
    enum = re.search(r"enum \{(.*?)\};", UDP_C, re.S)
    assert enum
    assert len(re.findall(r"\bD_[A-Z_]+", enum.group(1))) == len(REASONS) + 1  # D_COUNT


def test_the_tcp_engine_is_pure_c_so_its_thread_cannot_call_python():
    """engine.c and engine.h include no Python.h and name nothing of the C API: a Python
    call in the engine's thread would not compile. The binding (_native.c) is the rest."""
    for name in ("engine.c", "engine.h"):
        text = (PACKAGE / "tcp" / name).read_text()
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments may say "Python"
        assert "Python.h" not in code, name
        assert not re.findall(r"\bPy[A-Z_a-z]\w*|\bPY_\w+", code), name
    binding = (PACKAGE / "tcp" / "_native.c").read_text()
    assert '#include "engine.h"' in binding and "static void *engine_thread" not in binding


def test_the_tcp_binding_does_no_engine_work():
    """tcp/_native.c parses, calls engine.h's se_ functions and builds objects: no socket,
    epoll or descriptor call, no lock, and of engine_t only what the thread never writes."""
    code = re.sub(r"/\*.*?\*/", "", (PACKAGE / "tcp" / "_native.c").read_text(), flags=re.S)
    code = re.sub(r'"(?:\\.|[^"\\])*"', '""', code)  # docstrings may name them
    for call in ("epoll_ctl", "epoll_create1", "eventfd", "setsockopt", "shutdown", "close",
                 "pthread_mutex_lock", "pthread_create", "ioctl", "accept4", "splice"):  # fmt: skip
        assert not re.search(rf"\b{call}\s*\(", code), call
    fields = set(re.findall(r"\be\.(\w+)", code)) | set(re.findall(r"->e\.(\w+)", code))
    assert fields <= {"notify_fd", "told", "nbounds"}, fields
    used = set(re.findall(r"\b(se_\w+)\(", code))
    declared = set(re.findall(r"\b(se_\w+)\(", (PACKAGE / "tcp" / "engine.h").read_text()))
    assert used <= declared and len(used) >= 15, used - declared


def test_the_engines_close_reasons_and_admission_codes_are_pythons():
    """engine.h's R_* order is tcp/native.REASONS (lifecycle's words), SE_* is limits'."""
    from socket_echo import limits
    from socket_echo.lifecycle import ERROR, IDLE, PEER_CLOSED, RESET, STALLED
    from socket_echo.tcp.native import REASONS

    enum = re.search(r"enum \{ (R_PEER_CLOSED = 0.*?) \};", TCP_C)
    assert enum
    codes = dict(re.findall(r"(R_[A-Z_]+) = (\d+)", enum.group(1)))
    words = {"R_PEER_CLOSED": PEER_CLOSED, "R_RESET": RESET, "R_ERROR": ERROR,
             "R_IDLE": IDLE, "R_STALLED": STALLED}  # fmt: skip
    assert {REASONS[int(v)] for k, v in codes.items() if k in words} == set(words.values())
    assert all(REASONS[int(codes[k])] == w for k, w in words.items())
    assert int(codes["R_COUNT"]) == len(REASONS)
    admission = dict(re.findall(r"(SE_[A-Z_]+) = (\d+)", TCP_C))
    assert int(admission["SE_ADMITTED"]) == limits.ADMITTED
    assert int(admission["SE_OVER_CAP"]) == limits.OVER_CAP
    assert int(admission["SE_OVER_BUDGET"]) == limits.OVER_BUDGET


BENCH_C = (PACKAGE / "tools" / "bench" / "_native.c").read_text()


def test_the_bench_loops_constants_are_the_same_in_c_and_python():
    """bench/_native.c and its Python twin (bench/pingpong.py) read one owner each."""
    from socket_echo.tools import defaults
    from socket_echo.tools.connect import patterns

    assert define(BENCH_C, "LATE_SEND_US") == defaults.LATE_SEND_US
    assert define(BENCH_C, "SPIN_US") == defaults.SPIN_US
    assert define(BENCH_C, "CHECK_EVERY_US") == round(defaults.CHECK_EVERY * 1e6)
    assert define(BENCH_C, "MAX_SIZE") == defaults.MAX_SIZE
    assert define(BENCH_C, "MAX_IN_FLIGHT") == defaults.MAX_IN_FLIGHT
    assert define(BENCH_C, "PATTERN_PERIOD") == patterns.PATTERN_PERIOD
    assert define(BENCH_C, "SEQUENCE_STRIDE") == patterns.SEQUENCE_STRIDE


def test_the_bench_loops_error_kinds_are_named_the_same_in_c_and_python():
    from socket_echo.tools.bench import errors

    named = dict(re.findall(r'^#define (E_[A-Z_]+) "([^"]*)"', BENCH_C, re.M))
    assert named == errors.C_NAMES
    code = re.sub(r"/\*.*?\*/", "", BENCH_C, flags=re.S)
    calls = re.findall(r'replace(?:_errno)?\(r, p, "', code)
    assert not calls, "an error kind written as a literal in a replace() call"


def test_the_c_ping_pong_sends_the_bytes_the_pattern_says():
    """The message C sends for request n of worker w is Patterns' message for the seed
    pingpong_seed(n, w): both read the same buffer with the same constants."""
    from socket_echo.tools.connect.patterns import Patterns, pingpong_seed

    body = re.search(r"static const unsigned char \*message\(.*?\{(.*?)\}", BENCH_C, re.S)
    assert body and "SEQUENCE_STRIDE" in body.group(1) and "PATTERN_PERIOD" in body.group(1)
    p = Patterns(8)
    seq, worker = 3, 2
    start = (seq * 7 + worker) % 251  # what the C line computes, with the defines' values
    assert p.message(pingpong_seed(seq, worker)) == p.base[start : start + 8]
