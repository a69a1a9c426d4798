"""Test harness: the real server as a subprocess on loopback, ephemeral ports, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from socket_echo.loops import uvloop_available
from socket_echo.tcp.native import available as native_available

LOOPS = ["asyncio", "uvloop"] if uvloop_available() else ["asyncio"]
LISTEN_RE = re.compile(r"listening on ([\w+]+)://(\[[^\]]+\]|[^:\s/]+):(\d+)")
UNIX_RE = re.compile(r"listening on unix://(\S+)")


class ServerProcess:
    """``python -m socket_echo serve ARGS`` (or ``LAUNCHER serve ARGS``) with its stderr
    collected line by line."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], Any] | None = None,
        expect_listeners: int = 1,
        pass_fds: tuple[int, ...] = (),
        launcher: list[str] | None = None,
        measured: bool = True,
    ) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if not measured:
            full_env = unmeasured(full_env)
        self.proc = subprocess.Popen(
            [*(launcher or [sys.executable, "-m", "socket_echo"]), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.listeners: list[tuple[str, str, int]] = []
        deadline = time.monotonic() + 15
        while len(self.listeners) < expect_listeners:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("server did not start:\n" + self.log)
            with self._cond:
                self._cond.wait(0.05)
            self.listeners = self._parse_listeners()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _parse_listeners(self) -> list[tuple[str, str, int]]:
        found: list[tuple[str, str, int]] = []
        for line in list(self.lines):
            m = LISTEN_RE.search(line)
            if m:
                found.append((m.group(1), m.group(2).strip("[]"), int(m.group(3))))
            elif u := UNIX_RE.search(line):
                found.append(("unix", u.group(1), 0))
        return found

    def listener(self, scheme: str = "tcp") -> tuple[str, str, int]:
        """The first listener of that scheme (waiting a little for its log line)."""
        deadline = time.monotonic() + 10
        while True:
            self.listeners = self._parse_listeners()
            for entry in self.listeners:
                if entry[0] == scheme:
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no {scheme} listener in:\n{self.log}")
            time.sleep(0.02)

    def log_line_of(self, port: int) -> str:
        """The "listening" line of the listener on ``port``."""
        return next(ln for ln in list(self.lines) if LISTEN_RE.search(ln) and f":{port} " in ln)

    def listeners_of(self, scheme: str) -> list[tuple[str, str, int]]:
        """Every listener of that scheme (``listener`` waited for the first)."""
        self.listener(scheme)
        return [entry for entry in self._parse_listeners() if entry[0] == scheme]

    @property
    def port(self) -> int:
        return self.listener()[2]

    @property
    def host(self) -> str:
        return self.listener()[1]

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                m = regex.search(line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n{self.log}")
            with self._cond:
                self._cond.wait(0.05)

    def connect(self, host: str | None = None, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((host or self.host, self.port), timeout=timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def children(self) -> list[psutil.Process]:
        """Worker processes (--workers), oldest first."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(kids, key=lambda p: p.create_time())

    def kill(self) -> None:
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for kid in kids:  # workers of a killed supervisor: do not leave them behind
            with contextlib.suppress(psutil.NoSuchProcess):
                kid.kill()


def unmeasured(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a subprocess is not traced by coverage: for load-heavy tests
    whose code paths smaller tests cover already (tracing would triple their CPU cost)."""
    return {k: v for k, v in (env or os.environ).items() if k != "COVERAGE_PROCESS_CONFIG"}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m socket_echo ARGS`` to completion, as a user would run it (text; the tools'
    tools_helpers.tool is the same with bytes and stdin)."""
    return subprocess.run(
        [sys.executable, "-m", "socket_echo", *args],
        capture_output=True,
        text=kwargs.pop("text", True),
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        **kwargs,
    )


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """Poll ``check`` until it holds (the one way a test waits for a condition); fails
    naming ``what`` past ``timeout``. Returns how long it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(every)
    return time.monotonic() - started


def run_async(coro: Any, timeout: float = 30) -> Any:
    """An in-process client's coroutine to its end, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def echo_ok(to: socket.socket | int, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
    """The echo of ``payload`` came back whole, on a socket or a new connection to a port;
    False if the connection failed (a refused or killed one)."""
    try:
        if isinstance(to, int):
            with socket.create_connection(("127.0.0.1", to), timeout=timeout) as sock:
                return exchange(sock, payload) == payload
        return exchange(to, payload) == payload
    except OSError:
        return False


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One CA and the certificates the TLS, QUIC and DTLS tests use: the server's for
    127.0.0.1/localhost/::1 (``cert`` and ``key`` apart, and ``server``: key and chain in one
    file), a client's of the same CA and a stranger's of another (``client``, ``stranger``:
    key and chain; ``*-cert``, ``*-key`` apart, as aioquic reads them)."""
    import trustme

    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    files = {k: str(d / f"{k}.pem") for k in ("ca", "cert", "key", "server")}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    server.private_key_and_cert_chain_pem.write_to_path(files["server"])
    for name, issuer in (("client", ca), ("stranger", other_ca)):
        cert = issuer.issue_cert(f"{name}.example")
        for key, pem in ((name, cert.private_key_and_cert_chain_pem),
                         (f"{name}-cert", cert.cert_chain_pems[0]),
                         (f"{name}-key", cert.private_key_pem)):  # fmt: skip
            files[key] = str(d / f"{key}.pem")
            pem.write_to_path(files[key])
    return files


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """A user's mistake: this exit code, one line on stderr naming the cause, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# A server the test left with open connections drains them for --graceful-timeout (10 s):
# this long for a clean exit after SIGTERM (coverage's data), then it is killed.
TEARDOWN_GRACE = 0.5


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, host: str = "127.0.0.1", **kwargs: Any) -> ServerProcess:
        argv = list(args)
        if host and "--bind" not in argv and "--host" not in argv:
            argv += ["--host", host]
        if "--bind" not in argv and "--port" not in argv:
            argv += ["--port", "0"]
        server = ServerProcess(argv, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:  # SIGTERM first, so a coverage run keeps what the server ran
        if server.proc.poll() is None:
            server.signal(signal.SIGTERM)
    deadline = time.monotonic() + TEARDOWN_GRACE  # for all of them together, not each
    for server in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(max(0.0, deadline - time.monotonic()))
        server.kill()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[Callable[..., ServerProcess]]:
    """A server with these flags shared by the tests of one runner that only exchange bytes
    with it (no log, counter or limit of its own read, nothing done to it but echo): a
    server's start is most of such a test's CPU. A test that reads what the server says or
    did, or stops it, takes ``start_server``'s own."""
    servers: dict[tuple[str, ...], ServerProcess] = {}

    def get(*args: str) -> ServerProcess:
        server = servers.get(args)
        if server is None:
            server = servers[args] = ServerProcess([*args, "--host", "127.0.0.1", "--port", "0"])
        elif server.proc.poll() is not None:  # an earlier test's exchange ended it: a defect
            pytest.fail(f"the shared server {list(args)} exited {server.proc.returncode}:\n"
                        + server.log)  # fmt: skip
        return server

    yield get
    for server in servers.values():
        server.kill()


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


NATIVE = native_available()
ENGINES = ["native", "epoll", "protocol"] if NATIVE else ["epoll", "protocol"]
# Every TCP data path, each on the loops where it behaves differently: the Protocol path on
# both (transports, EMFILE handling and TLS differ between uvloop and the stdlib loop); the
# native and epoll paths run their own epoll and only register one descriptor with the loop,
# so one loop covers each: the default one, as users run it.
# The native cases carry the ``native`` marker: the sanitizer gates select them by it (a
# substring of ids would not do: "uvloop-native" contains "loop").
PATHS = [
    pytest.param((LOOPS[-1], e), marks=[pytest.mark.native] if e == "native" else [])
    for e in ENGINES
    if e != "protocol"
] + [pytest.param((loop, "protocol")) for loop in LOOPS]


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[1]}")
def server_flags(request: pytest.FixtureRequest) -> list[str]:
    """Every TCP data path, on the loops that matter to it (PATHS)."""
    loop, engine = request.param
    return ["--loop", loop, "--engine", engine]


def refused_answer(port: int, host: str = "127.0.0.1") -> bytes:
    """What a connection over the cap gets back: it is reset at once, at connect, send or
    receive, whichever it meets first (a loaded machine may deliver the reset before
    connect() returns); b"" unless the server echoed it (which it must never do)."""
    try:
        with socket.create_connection((host, port), timeout=5) as extra:
            extra.sendall(b"over")
            return extra.recv(10)
    except (ConnectionResetError, BrokenPipeError):
        return b""


# Up to this many bytes are sent before the echo is read, in one thread: loopback's socket
# buffers (hundreds of KiB each way) hold them whatever the server does; a thread per
# exchange was most of the hundred-client test's CPU.
INLINE_EXCHANGE = 64 * 1024


def exchange(sock: socket.socket, data: bytes, chunk: int = 1 << 20) -> bytes:
    """Send ``data`` (from a thread, beyond INLINE_EXCHANGE) while reading its echo; returns
    what came back.

    Over TLS, one thread: OpenSSL's SSL object is not safe to write from one thread while
    another reads (that lost bytes now and then: a flaky test, not a server fault). There it
    goes in 64 KiB steps, each sent and read back before the next."""
    if isinstance(sock, ssl.SSLSocket):
        got = bytearray()
        for i in range(0, len(data), 1 << 16):
            piece = data[i : i + (1 << 16)]
            sock.sendall(piece)
            got += recv_exactly(sock, len(piece))
            if len(got) < i + len(piece):
                break
        return bytes(got)
    if len(data) <= INLINE_EXCHANGE:  # fits in the socket buffers: no thread needed
        for i in range(0, len(data), chunk):
            sock.sendall(data[i : i + chunk])
        return recv_exactly(sock, len(data))
    error: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(data)
            for i in range(0, len(data), chunk):
                sock.sendall(view[i : i + chunk])
        except BaseException as exc:  # reported by the caller
            error.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    got = recv_exactly(sock, len(data))
    sender.join()
    if error:
        raise error[0]
    return got


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(1 << 20, n - len(buf)))
        if not part:
            break
        buf += part
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        part = sock.recv(1 << 20)
        if not part:
            return bytes(buf)
        buf += part


def is_closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server has closed (EOF or reset) this connection within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


# -- metrics and figures ------------------------------------------------------------------


def metrics_port(server: ServerProcess) -> int:
    """The --metrics port a server logged."""
    m = server.wait_for_log(r"metrics and health on http://127\.0\.0\.1:(\d+)")
    return int(m.group(1))


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, label order as the server writes it."""
    url = f"http://127.0.0.1:{port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def http_status(port: int, path: str) -> int:
    """The status of GET http://127.0.0.1:PORT/PATH (health and readiness probes)."""
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status)
    except urllib.error.HTTPError as exc:
        return exc.code


def poll_scrape(
    server: ServerProcess, check: Callable[[dict[str, float]], bool], timeout: float = 15.0
) -> dict[str, float]:
    """Scrape the server's /metrics until ``check(samples)`` holds or ``timeout`` passes;
    returns the last scrape (the caller asserts on it, so a timeout shows the values)."""
    port = metrics_port(server)
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a series over the labels not given."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for k, v in samples.items()
        if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
    )


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a measured figure; the run's summary lists them (README: Reliability)."""

    def note(text: str) -> None:
        request.node.user_properties.append(("figure", f"{request.node.name}: {text}"))

    return note


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [
        value
        for report in terminalreporter.stats.get("passed", [])
        for key, value in getattr(report, "user_properties", [])
        if key == "figure"
    ]
    if lines:
        terminalreporter.section("figures measured by the tests")
        for line in sorted(lines):
            terminalreporter.line(line)
