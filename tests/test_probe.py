"""probe: passes a good server, fails corrupting or mute ones, reports the seed's findings."""

from __future__ import annotations

import json
import socket
import time

import pytest
from tools_helpers import Broken, tool


@pytest.fixture
def broken():  # type: ignore[no-untyped-def]
    started: list[Broken] = []

    def start(mode: str) -> Broken:
        server = Broken(mode)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def probe_json(*args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = tool("probe", *args, "--json")
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def test_our_server_passes_every_step(shared_server):
    server = shared_server()
    code, report = probe_json(f"127.0.0.1:{server.port}")
    assert code == 0, report
    assert report["passed"] and report["findings"] == []
    names = [s["name"] for s in report["steps"]]
    assert "net-tools: binary 4 B" in names and "half-close" in names
    assert all(s["status"] == "pass" for s in report["steps"])
    latency = next(s for s in report["steps"] if s["name"].startswith("latency"))
    assert latency["p50_us"] > 0 and latency["p99_us"] >= latency["p50_us"]


def test_ipv6_target_and_url_forms(start_server):
    server = start_server(host="::1")
    assert tool("probe", f"[::1]:{server.port}", "--quick").returncode == 0
    assert tool("probe", f"tcp://[::1]:{server.port}", "--quick").returncode == 0


@pytest.mark.parametrize("mode", ["drop", "reorder"])
def test_corrupting_servers_fail(broken, mode):
    server = broken(mode)
    code, report = probe_json(f"127.0.0.1:{server.port}", "--timeout", "0.5")
    assert code == 1
    failed = [s for s in report["steps"] if s["status"] == "fail"]
    assert failed and any("differs" in s["detail"] or "byte" in s["detail"] for s in failed)


@pytest.mark.parametrize("mode", ["mute", "deaf"])
def test_a_mute_or_wedged_peer_is_judged_at_once_and_named(broken, mode):
    """A peer whose stack accepts while its application never answers (a wedged board: the
    seed after a reset) took 13 failing steps and 82 s to judge. The first step that gets not
    one byte back now says what it means, and what cannot pass is skipped."""
    server = broken(mode)
    started = time.monotonic()
    code, report = probe_json(f"127.0.0.1:{server.port}", "--timeout", "1")
    took = time.monotonic() - started
    assert code == 1
    first, verdict = report["steps"][:2]
    assert first["status"] == "fail" and "sent 1 of 1 B, 0 came back" in first["detail"]
    assert verdict["name"] == "verdict" and verdict["status"] == "fail"
    assert verdict["detail"].startswith("connects, but no byte ever came back")
    skipped = report["steps"][2:]
    assert len(skipped) == 12 and all(s["status"] == "skip" for s in skipped), skipped
    assert took < 8, took  # one timeout and the ending, not 13 of them
    assert tool("probe", f"127.0.0.1:{server.port}", "--quick", "--timeout", "0.3").returncode == 1


def test_seed_like_server_passes_with_findings(broken):
    server = broken("seed")
    code, report = probe_json(f"127.0.0.1:{server.port}", "--timeout", "1.5")
    assert code == 0, [s for s in report["steps"] if s["status"] == "fail"]
    findings = " | ".join(report["findings"])
    assert "serves one client at a time" in findings
    assert "Nagle" in findings


def test_require_concurrency_fails_a_seed_like_server(broken):
    server = broken("seed")
    code, report = probe_json(
        f"127.0.0.1:{server.port}", "--require-concurrency", "--timeout", "1.5"
    )
    assert code == 1
    failed_steps = [s for s in report["steps"] if s["status"] == "fail"]
    assert len(failed_steps) == 1, failed_steps
    (failed,) = failed_steps
    assert "one client at a time" in failed["detail"]


def test_unreachable_is_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tool("probe", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert b"unreachable" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "http://x", "[::1", "::1:80"])
def test_bad_target_is_exit_2_with_one_line(target):
    result = tool("probe", target)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_udp_probe_good_lossy_and_mute(broken):
    good = broken("udp")
    code, report = probe_json(f"udp://127.0.0.1:{good.port}")
    assert code == 0, report
    names = [s["name"] for s in report["steps"]]
    assert "udp: empty datagram" in names and "udp: datagram 1280 B" in names
    lossy = broken("udp-lossy")  # every 2nd datagram lost: the retries cover it
    code, report = probe_json(f"127.0.0.1:{lossy.port}", "--udp", "--timeout", "0.6")
    assert code == 0, report
    assert any("retr" in s["detail"] for s in report["steps"])
    mute = broken("udp-mute")
    code, _ = probe_json(f"udp://127.0.0.1:{mute.port}", "--timeout", "0.3")
    assert code == 2


def test_terminal_free_report_is_plain_text(shared_server):
    server = shared_server()
    result = tool("probe", f"127.0.0.1:{server.port}")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "conforms" in text and "half-close" in text


def test_a_step_has_a_deadline_from_its_size_and_the_timeout(broken):
    """probe --timeout bounded silence only: a 1 B/s trickle held a step for ever. Now a
    step of N bytes ends within timeout + N / ECHO_FLOOR_RATE, naming what came back."""
    from socket_echo.tools.defaults import ECHO_FLOOR_RATE
    from socket_echo.tools.probe.stream import StepFailed, round_trip

    server = broken("trickle")
    data = b"p" * 4096
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        with pytest.raises(StepFailed, match=r"too slow: \d+ of 4096 bytes back"):
            round_trip(sock, data, 0.5)
        took = time.monotonic() - started
    assert took < 0.5 + len(data) / ECHO_FLOOR_RATE + 1.0, took


def test_udp_probe_finds_the_largest_datagram_echoed(broken, start_server):
    """A stack that does not reassemble IPv4 fragments (Zephyr without
    CONFIG_NET_IPV4_FRAGMENT, small lwIP builds) answers nothing over one frame: found by a
    search up to 65,507 B, as a finding; our server echoes every size UDP allows."""
    small = broken("udp-small")
    code, report = probe_json(f"udp://127.0.0.1:{small.port}", "--timeout", "0.6")
    step = next(s for s in report["steps"] if s["name"] == "udp: largest datagram")
    assert step["status"] == "finding" and step["largest_echoed"] == 1472, step
    assert code == 0
    server = start_server("--udp-rate", "100000", "--udp-burst", "100000")
    _, host, port = server.listener("udp")
    code, report = probe_json(f"udp://{host}:{port}")
    step = next(s for s in report["steps"] if s["name"] == "udp: largest datagram")
    assert step["status"] == "pass" and step["largest_echoed"] == 65507, step
    assert step["path_mtu"] and step["path_mtu"] >= 1280
