"""bench over tls://: every mode byte-verified against a real TLS listener (the certificate
verified with --ca), the open loop, churn's handshakes and --tls-resume's resumed sessions,
mutual TLS with --cert/--key (refused without), and the flags' mistakes in one line."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import NATIVE, assert_one_line_error, run_cli

try:
    from socket_echo.tools.bench import _native  # type: ignore[attr-defined,unused-ignore]
except ImportError:
    _native = None


def bench(target: str, *args: str, pure: bool = False) -> tuple[int, dict[str, Any], str]:
    env = {"SOCKET_ECHO_NO_EXTENSIONS": "1"} if pure else None
    done = run_cli("bench", target, "-c", "2", "-d", "0.25", "-p", "1", "--json", "-", *args,
                   env=env)  # fmt: skip
    data = json.loads(done.stdout[done.stdout.index("{") :]) if "{" in done.stdout else {}
    return done.returncode, data, done.stderr


@pytest.fixture(scope="module")
def tls_server(pki):  # type: ignore[no-untyped-def]
    from conftest import ServerProcess

    server = ServerProcess(["--bind", "tls://127.0.0.1:0", "--tls-cert", pki["cert"],
                            "--tls-key", pki["key"]])  # fmt: skip
    yield server
    server.kill()


C_TLS = bool(getattr(_native, "TLS", 0)) if NATIVE and _native is not None else False
C_MARKS = [
    pytest.mark.native,
    pytest.mark.skipif(not C_TLS, reason="bench's C loop was built without OpenSSL"),
]
LOOPS = [pytest.param("c", marks=C_MARKS), "python"]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "loop"),
    [
        pytest.param("pingpong", "c", marks=C_MARKS, id="pingpong-c"),
        ("pingpong", "python"),
        ("stream", "python"),
        ("churn", "python"),
    ],
)
def test_every_mode_over_tls_is_verified_byte_for_byte(tls_server, pki, mode, loop):
    _, host, port = tls_server.listener("tls")
    code, r, err = bench(f"tls://{host}:{port}", "--ca", pki["ca"], "--mode", mode,
                         pure=loop == "python")  # fmt: skip
    assert code == 0, err
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["requests"] > 0, r["error_kinds"]
    # said once when the Python loop runs: the figures include the client's TLS
    assert ("Python loop" in err) == (loop == "python" or mode != "pingpong"), err
    if mode == "churn":
        assert r["tls_handshakes"] == r["requests"] and r["tls_resumed"] == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_the_open_loop_over_tls_keeps_its_schedule(tls_server, pki, loop):
    _, host, port = tls_server.listener("tls")
    code, r, err = bench(f"tls://{host}:{port}", "--ca", pki["ca"], "--rate", "800",
                         pure=loop == "python")  # fmt: skip
    assert code == 0, err
    assert r["latency_from"] == "intended send time (corrected)"
    assert 150 <= r["sends"] <= 204 and r["errors"] == 0, r  # 800/s for 0.25 s


def test_churn_resumes_the_sessions_it_offers(tls_server, pki):
    _, host, port = tls_server.listener("tls")
    code, r, err = bench(f"tls://{host}:{port}", "--ca", pki["ca"], "--mode", "churn",
                         "--tls-resume")  # fmt: skip
    assert code == 0, err
    assert r["tls_handshakes"] > 10, r
    assert r["tls_resumed"] >= r["tls_handshakes"] - 4, r  # each worker's first is full
    assert "resumed sessions" in err


@pytest.mark.parametrize("loop", LOOPS)
def test_mutual_tls_with_cert_and_key(pki, loop):
    from conftest import ServerProcess

    server = ServerProcess(["--bind", "tls://127.0.0.1:0", "--tls-cert", pki["cert"],
                            "--tls-key", pki["key"], "--tls-client-ca", pki["ca"]])  # fmt: skip
    try:
        _, host, port = server.listener("tls")
        target = f"tls://{host}:{port}"
        code, r, err = bench(target, "--ca", pki["ca"], "--cert", pki["client-cert"], "--key",
                             pki["client-key"], pure=loop == "python")  # fmt: skip
        assert code == 0 and r["errors"] == 0 and r["requests"] > 0, err
        refused, _, err = bench(target, "--ca", pki["ca"], pure=loop == "python")
        assert refused in (1, 2), err  # no certificate: no echo
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--tls-resume",), "--tls-resume is for --mode churn over tls://"),
        (("--key", __file__), "needs --cert"),
    ],
)
def test_the_flags_mistakes_are_one_line(args, words):
    assert_one_line_error(run_cli("bench", "tls://127.0.0.1:9", *args), 2, words)
