"""The command line: flags, environment variables, logs, and one clear line for mistakes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from conftest import assert_one_line_error, exchange, run_cli, wait_until

PY = [sys.executable, "-m", "socket_echo"]


def test_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--host", "127.0.0.1", "--port", str(port))
    assert_one_line_error(result, 1, "address already in use", str(port))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "70000"], ["70000", "out of range"]),
        (["--port", "-1"], ["out of range"]),
        (["--port", "abc"], ["--port", "abc"]),
        (["--bind", "tcp://127.0.0.1:99999"], ["--bind"]),
        (["--bind", "http://127.0.0.1:80"], ["unknown scheme"]),
        (["--bind", "127.0.0.1:4242"], ["unknown scheme"]),
        (["--bind", "tcp://:4242"], ["no host"]),
        (["--bind", "tcp://[nonsense]:1"], ["IPv6"]),
        (
            ["--host", "no-such-host.invalid", "--port", "0"],
            ["unknown host", "no-such-host.invalid"],
        ),
        (["--max-connections", "0"], ["--max-connections"]),
        (["--max-buffer", "lots"], ["--max-buffer", "byte size"]),
        (["--loop", "tokio"], ["--loop"]),
        (["--frobnicate"], ["--frobnicate"]),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args, words):
    assert_one_line_error(run_cli(*args), 2, *words)


def test_bad_environment_value_names_the_variable():
    result = run_cli(env={"SOCKET_ECHO_PORT": "forty-two"})
    assert_one_line_error(result, 2, "SOCKET_ECHO_PORT", "forty-two")
    from_the_command_line = run_cli("--port", "nan", env={"SOCKET_ECHO_PORT": "4242"})
    assert_one_line_error(from_the_command_line, 2, "--port", "nan")
    assert "SOCKET_ECHO_PORT" not in from_the_command_line.stderr  # it blamed the variable


def test_privileged_port_without_permission_is_exit_1():
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            if int(f.read()) <= 7:
                pytest.skip("this machine lets anybody bind low ports")
    except OSError:
        pass
    cmd = [*PY, "--host", "127.0.0.1", "--port", "7"]
    if os.geteuid() == 0:  # root: drop just the capability that allows low ports
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv (util-linux) is not installed")
        cmd = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    assert_one_line_error(result, 1, "permission denied", ":7")


def test_environment_variables_configure_and_the_command_line_wins(start_server):
    server = start_server(
        "--port",
        "0",
        env={
            "SOCKET_ECHO_PORT": "not-used",
            "SOCKET_ECHO_MAX_CONNECTIONS": "3",
            "SOCKET_ECHO_LOG_FORMAT": "json",
        },
    )
    assert "up to 3 clients" in server.log
    first = json.loads(server.lines[0])
    assert first["event"] == "listening" and first["port"] == server.port


def test_help_lists_every_flag_with_its_environment_variable():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "host",
        "port",
        "bind",
        "backlog",
        "max-connections",
        "idle-timeout",
        "max-buffer",
        "loop",
        "log-level",
        "log-format",
        "graceful-timeout",
    ):
        assert f"--{flag}" in result.stdout
        assert "SOCKET_ECHO_" + flag.upper().replace("-", "_") in result.stdout
    for heading in ("Listeners:", "Limits:", "Runtime and logging:"):
        assert heading in result.stdout
    assert run_cli("--help").returncode == 0
    assert run_cli("--version").stdout.strip().startswith("socket-echo")


def test_console_script_alone_means_serve(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "socket-echo")
    if not os.path.exists(exe):
        pytest.skip("console script not installed")
    result = subprocess.run([exe, "--port", "70000"], capture_output=True, text=True, timeout=10)
    assert_one_line_error(result, 2, "out of range")


def test_log_lines_show_real_port_peer_bytes_duration_and_reason(start_server):
    server = start_server()
    assert f"listening on tcp://127.0.0.1:{server.port}" in server.log
    with server.connect() as sock:
        local = sock.getsockname()
        assert exchange(sock, b"12345") == b"12345"
    server.wait_for_log(rf"connection #1 from 127\.0\.0\.1:{local[1]}$")
    m = server.wait_for_log(rf"connection #1 from 127\.0\.0\.1:{local[1]} closed: (.*)$")
    assert m.group(1).startswith("peer closed; in 5 B, out 5 B, ")
    assert m.group(1).endswith(" s")


def test_json_log_lines_carry_structured_fields(start_server):
    server = start_server("--log-format", "json")
    with server.connect() as sock:
        assert exchange(sock, b"abc") == b"abc"
    server.wait_for_log(r'"event":"connection_close"')
    events = [json.loads(line) for line in server.lines]
    close = next(e for e in events if e["event"] == "connection_close")
    assert close["bytes_in"] == 3 and close["bytes_out"] == 3
    assert close["reason"] == "peer closed" and close["conn"] == 1
    assert close["listener"] == f"tcp://127.0.0.1:{server.port}"
    assert {"time", "level", "peer", "duration"} <= close.keys()


def test_log_level_warning_hides_connection_lines(start_server):
    """At --log-level warning the server says nothing, not even its port: the test picks a
    free one (and picks again if another process took it before the server bound it)."""
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = start_server("--log-level", "warning", "--port", str(port), expect_listeners=0)
        sock: socket.socket | None = None

        def listening_or_gone(port: int = port, server: Any = server) -> bool:
            nonlocal sock
            with contextlib.suppress(ConnectionRefusedError):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            return sock is not None or server.proc.poll() is not None

        wait_until(listening_or_gone, 20, "the quiet server listening (or exiting)")
        if sock is not None:
            break
    assert sock is not None, server.log
    with sock:
        assert exchange(sock, b"quiet") == b"quiet"
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert "connection #" not in server.log
    assert "listening" not in server.log


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--udp-io", "mmsg"], "--udp-io mmsg: this platform has no recvmmsg (use --udp-io loop)"),
        (
            ["--engine", "epoll"],
            "--engine epoll: this platform has no epoll (use --engine protocol)",
        ),
    ],
)
def test_a_data_path_this_platform_lacks_is_one_line(monkeypatch, capsys, flags, message):
    """As on macOS: no recvmmsg, no epoll. The server must say so before it binds anything."""
    import select as select_module

    from socket_echo import cli
    from socket_echo.udp import mmsg as udp_mmsg

    monkeypatch.setattr(udp_mmsg, "LIBC", None)
    monkeypatch.delattr(select_module, "epoll")
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--host", "127.0.0.1", "--port", "0", *flags])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"socket-echo: error: {message}"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--engine", "native"], "--engine native: SOCKET_ECHO_NO_EXTENSIONS is set"),
        (["--udp-io", "native"], "--udp-io native: the compiled extension is not available"),
    ],
)
def test_native_paths_refused_in_one_line_when_extensions_are_off(flags, words):
    result = run_cli(
        "serve",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        *flags,
        env={"SOCKET_ECHO_NO_EXTENSIONS": "1"},
    )
    assert_one_line_error(result, 2, words)


def test_no_extensions_makes_auto_pick_the_pure_paths_and_the_log_says_so(start_server):
    pure = start_server(expect_listeners=2, env={"SOCKET_ECHO_NO_EXTENSIONS": "1"})
    pure.wait_for_log(r"TCP echo server listening on .*; epoll path\)")
    pure.wait_for_log(r"UDP echo server listening on .*; mmsg path\)")
    with pure.connect() as sock:
        sock.sendall(b"pure")
        assert sock.recv(10) == b"pure"
    from socket_echo.tcp.native import available

    if available():
        default = start_server(expect_listeners=2)
        default.wait_for_log(r"TCP echo server listening on .*; native path\)")
        default.wait_for_log(r"UDP echo server listening on .*; native path\)")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("cc") is None,
    reason="the extensions are built where Linux has a C compiler",
)
def test_the_native_extensions_are_built_where_they_can_be():
    """Otherwise every native variant of the suite would quietly drop out."""
    from socket_echo.tcp import native as tcp_native
    from socket_echo.tools.bench import pingpong
    from socket_echo.udp import native as udp_native

    assert tcp_native._native is not None
    assert udp_native._native is not None
    assert pingpong._native is not None


@pytest.mark.parametrize(
    "args, words",
    [
        # nan passed click's ranges (it compares false with every bound) and lifted limits
        (["--udp-rate", "nan"], ["--udp-rate", "not a finite number"]),
        (["--udp-max-rate", "nan"], ["--udp-max-rate", "not a finite number"]),
        (["--idle-timeout", "nan"], ["--idle-timeout", "not a finite number"]),
        (["--graceful-timeout", "inf"], ["--graceful-timeout", "range"]),
        (["--tls-handshake-timeout", "nan"], ["--tls-handshake-timeout", "not a finite"]),
        (["--proxy-header-timeout", "nan"], ["--proxy-header-timeout", "not a finite"]),
        (["--backlog", "99999999999"], ["--backlog", "65535"]),
        (["--max-buffer", "99999999999999999999KiB"], ["--max-buffer", "16 KiB and 1 GiB"]),
        (["--max-buffer", "100"], ["--max-buffer", "16 KiB and 1 GiB"]),
        (["--workers", "100000"], ["--workers 100000: at most", "per usable core"]),
        (["--metrics", "127.0.0.1:70000"], ["port 70000 is out of range"]),
        (["bench", "127.0.0.1:9", "-p", "100000"], ["--processes 100000: at most"]),
        (["bench", "127.0.0.1:9", "-d", "nan"], ["--duration", "not a finite number"]),
        (["bench", "127.0.0.1:9", "--rate", "nan"], ["--rate", "not a finite number"]),
        (["bench", "127.0.0.1:9", "--rate", "inf"], ["--rate", "range"]),
        (["client", "tcp://[::1"], ["malformed 'tcp://[::1'"]),
        (["probe", "udp://[zz]:5"], ["malformed 'udp://[zz]:5'", "zz"]),
        # values that ran and measured nothing: a lower bound that means something
        (["--idle-timeout", "1e-300"], ["--idle-timeout", "too small", "at least 0.001 (or 0)"]),
        (["--udp-rate", "1e-300"], ["--udp-rate", "too small", "at least 0.01"]),
        (["--tls-handshake-timeout", "1e-9"], ["--tls-handshake-timeout", "too small"]),
        (["bench", "127.0.0.1:9", "--rate", "1e-300"], ["--rate", "too small"]),
        (["bench", "127.0.0.1:9", "--rate", "0.5", "-d", "1"], ["--rate 0.5", "no request"]),
        (["--bind", "tcp://user@127.0.0.1:1"], ["--bind", "a listener has no user"]),
        (["--port", "nan"], ["'--port'", "'nan'"]),
    ],
)
def test_a_value_that_would_hurt_is_refused_before_anything_starts(args, words):
    assert_one_line_error(run_cli(*args), 2, *words)
