"""Multicast echo, one to many: N responders (socket-echo serve joining a group) each in a
network namespace of its own, the sender in another, all on one bridge in a hub namespace,
made here and removed after (198.51.100.0/24 and fd51::/64, documentation prefixes). probe
lists every responder; bench measures each apart, and one killed half-way shows as lost, not
as an error of the others; the UDP guard holds for group traffic. IPv4 and IPv6.

Needs root on Linux and iproute2's ip: elsewhere these skip with one line, and make test's
netns gate (with the lwIP board's) says how many ran; CI fails on fewer than all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import ServerProcess, metrics_port, total, wait_until

pytestmark = pytest.mark.multicast

GROUP4, GROUP6 = "239.192.0.2", "ff84::2"  # the groups Zephyr's net-tools echo-server answers
PORT = 4242


def why_not() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "the multicast segment needs root on Linux (network namespaces)"
    if shutil.which("ip") is None:
        return "the multicast segment needs iproute2's ip"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Segment:
    """A bridge in a hub namespace; a sender and ``n`` responders, each in a namespace of
    its own with one veth (``eth0``) on the bridge."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 10000}{time.monotonic_ns() % 1000}"
        self.hub = f"se-mc-hub-{tag}"
        self.sender = f"se-mc-s-{tag}"
        self.members = [f"se-mc-r{i}-{tag}" for i in range(n)]
        self.made: list[str] = []
        self.servers: list[ServerProcess] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        for ns in (self.hub, self.sender, *self.members):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate((self.sender, *self.members)):
            outer, inner = f"mc{tag}h{i}"[:15], f"mc{tag}m{i}"[:15]
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "netns", self.hub)
            ip("link", "set", inner, "netns", ns)
            ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
            ip("-n", ns, "link", "set", inner, "name", "eth0")
            ip("-n", ns, "addr", "add", f"198.51.100.{10 + i}/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", f"fd51::{10 + i}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")

    def address(self, member: int, v6: bool) -> str:
        return f"fd51::{11 + member}" if v6 else f"198.51.100.{11 + member}"

    def serve(self, member: int, *args: str) -> ServerProcess:
        binds = ["--bind", f"udp://{GROUP4}:{PORT}?iface=eth0",
                 "--bind", f"udp://[{GROUP6}]:{PORT}?iface=eth0"]  # fmt: skip
        server = ServerProcess(
            [*binds, *args],
            launcher=[
                "ip",
                "netns",
                "exec",
                self.members[member],
                sys.executable,
                "-m",
                "socket_echo",
            ],
            expect_listeners=2 + args.count("--bind"),
        )
        self.servers.append(server)
        return server

    def tool(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.sender, sys.executable, "-m", "socket_echo", *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def segment() -> Iterator[Segment]:
    if reason := why_not():
        pytest.skip(reason)
    made = Segment(3)
    yield made
    made.close()


def target(v6: bool, query: str = "iface=eth0") -> str:
    return f"udp://[{GROUP6}]:{PORT}?{query}" if v6 else f"udp://{GROUP4}:{PORT}?{query}"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_probe_lists_every_responder_and_what_each_got_right(segment, v6):
    for i in range(3):
        segment.serve(i)
    done = segment.tool("probe", target(v6), "--json", "--expect-responders", "3", "--timeout", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    members = {s["name"]: s for s in report["steps"] if s["name"].startswith("responder ")}
    assert set(members) == {f"responder {segment.address(i, v6)}" for i in range(3)}, members
    for step in members.values():
        assert step["status"] == "pass" and step["echoed"] == 4, step
        assert step["altered"] == 0 and step["missing"] == 0
    more = segment.tool("probe", target(v6), "--expect-responders", "4", "--timeout", "1")
    assert more.returncode == 1, more.stdout + more.stderr
    assert "fewer than --expect-responders 4" in more.stdout


def answered_by(segment: Segment, member: int, server: ServerProcess) -> float:
    """The datagrams a member answered so far: its /metrics, scraped inside its namespace."""
    port = metrics_port(server)
    code = (
        "import urllib.request as u;"
        f"print(u.urlopen('http://127.0.0.1:{port}/metrics',timeout=5).read().decode())"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", segment.members[member], sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    samples = {}
    for line in done.stdout.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return total(samples, "socket_echo_udp_datagrams_total", direction="out")


def test_bench_measures_each_member_and_a_killed_one_shows_as_lost(segment):
    servers = [segment.serve(i, "--metrics", "127.0.0.1:0") for i in range(3)]
    bench = subprocess.Popen(
        ["ip", "netns", "exec", segment.sender, sys.executable, "-m", "socket_echo", "bench",
         target(False), "-c", "2", "-d", "4", "-p", "1", "--json", "-", "--expect-responders",
         "3", "--slo", "lost_datagrams<=2@responder", "--slo", "responders>=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: answered_by(segment, 1, servers[1]) > 200,
            15,
            "member 1 answers the load",
            every=0.2,
        )
        servers[1].kill()  # half-way: its answers stop
        out, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    result = json.loads(out[out.index("{") :])
    by = {m["address"]: m for m in result["responders"]}
    assert set(by) == {segment.address(i, False) for i in range(3)}, by
    killed = by[segment.address(1, False)]
    assert killed["lost"] > 0 and killed["answered"] > 0, killed
    for i in (0, 2):
        alive = by[segment.address(i, False)]
        assert alive["lost"] <= 2 and alive["answered"] > killed["answered"], alive
        assert alive["latency_us"]["p50"] is not None
    assert result["mismatches"] == 0 and result["errors"] == 0, result["error_kinds"]
    assert "slowest" in err or "silent after" in err, err
    lost_slo, count_slo = result["slo"]  # the killed member misses it, alone: exit 3
    assert lost_slo["missed_by"] == [segment.address(1, False)] and count_slo["passed"]
    assert bench.returncode == 3, err
    print("\n" + err)


def test_the_guard_holds_for_group_traffic(segment):
    """A privileged source port (a reflection's usual victim) is never answered by any
    member; an ordinary one is, by all."""
    for i in range(3):
        segment.serve(i)
    script = (
        "import socket,struct,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,"
        "struct.pack('=4s4si',b'\\0'*4,b'\\0'*4,socket.if_nametoindex('eth0')))\n"
        f"s.bind(('0.0.0.0',int(sys.argv[1])));s.settimeout(1.5)\n"
        f"s.sendto(b'reflect?',('{GROUP4}',{PORT}))\n"
        "n=0\n"
        "try:\n"
        "    while True: s.recvfrom(100); n+=1\n"
        "except OSError: pass\n"
        "print(n)\n"
    )
    answers = {}
    for port in ("1000", "40000"):
        done = subprocess.run(
            ["ip", "netns", "exec", segment.sender, sys.executable, "-c", script, port],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers[port] = int(done.stdout)
    assert answers == {"1000": 0, "40000": 3}, answers


def test_a_group_listener_names_a_missing_interface_in_one_line():
    """No namespace needed: the interface is looked up before anything is served."""
    from conftest import assert_one_line_error, run_cli

    missing = run_cli("serve", "--bind", f"udp://{GROUP4}:{PORT}?iface=nosuch0")
    assert_one_line_error(missing, 1, "no network interface 'nosuch0'")
    unicast = run_cli("serve", "--bind", "udp://127.0.0.1:4242?iface=lo")
    assert_one_line_error(unicast, 2, "is for a multicast group")
    tcp = run_cli("serve", "--bind", f"tcp://{GROUP4}:{PORT}")
    assert_one_line_error(tcp, 2, "joined by udp:// listeners only")
    bad = run_cli("probe", f"udp://{GROUP4}:{PORT}?ttl=300")
    assert_one_line_error(bad, 2, "ttl")
    for tool in ("probe", "bench", "client"):  # the interface is looked up before anything
        missing = run_cli(tool, f"udp://{GROUP4}:{PORT}?iface=nosuch0", input="x\n")
        assert_one_line_error(missing, 2, "no network interface 'nosuch0'")


def test_client_writes_the_first_members_echo(segment):
    for i in range(2):
        segment.serve(i)
    done = subprocess.run(
        ["ip", "netns", "exec", segment.sender, sys.executable, "-m", "socket_echo", "client",
         target(False)],
        input=b"one datagram\n", capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"one datagram\n"
    assert b"answering: 198.51.100." in done.stderr


def test_the_open_loop_sends_on_its_schedule_and_times_each_member_from_the_slot(segment):
    for i in range(2):
        segment.serve(i)
    done = segment.tool("bench", target(True), "--rate", "200", "-c", "2", "-d", "1.5", "-p",
                        "1", "--json", "-")  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout[done.stdout.index("{") :])
    assert r["latency_from"] == "intended send time (corrected)"
    assert 250 <= r["sends"] <= 305, r["sends"]  # 200/s for 1.5 s
    members = {m["address"]: m for m in r["responders"]}
    assert set(members) == {segment.address(i, True) for i in range(2)}
    for m in members.values():
        assert m["answered"] >= r["sends"] - 3 and m["lost"] <= 2, m
        assert m["latency_us"]["p50"] is not None


def test_a_source_specific_join_hears_only_that_source(segment):
    """?source= (IGMPv3's INCLUDE): a member joined for the sender's address answers it; one
    joined for another source does not hear it at all."""
    segment.serve(0, "--bind", f"udp://{GROUP4}:{PORT + 1}?iface=eth0&source=198.51.100.10")
    segment.serve(1, "--bind", f"udp://{GROUP4}:{PORT + 1}?iface=eth0&source=198.51.100.99")
    done = segment.tool("probe", f"udp://{GROUP4}:{PORT + 1}?iface=eth0", "--json",
                        "--timeout", "1")  # fmt: skip
    report = json.loads(done.stdout)
    members = [s["name"] for s in report["steps"] if s["name"].startswith("responder ")]
    assert members == [f"responder {segment.address(0, False)}"], report
