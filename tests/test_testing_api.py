"""socket_echo.testing and its pytest plugin, used as a project's tests would use them after
`pip install socket-echo`: the fixtures come from the pytest11 entry point, not conftest."""

from __future__ import annotations

import pytest

from socket_echo.config import ConfigError
from socket_echo.testing import bench, probe


def test_echo_server_fixture_and_probe_verdict(echo_server):
    result = probe(echo_server.target, timeout=2)
    assert result.conforms, result.failures
    assert result.findings == []
    udp = probe(echo_server.target_of("udp"), timeout=2)
    assert udp.conforms and any(s.name == "udp: largest datagram" for s in udp.steps)
    opened = echo_server.metrics()
    assert any(k.startswith("socket_echo_connections_opened_total") for k in opened)


def test_bench_returns_the_typed_result_with_its_objectives(echo_server):
    run = bench(echo_server.target, connections=2, duration=0.3, slo=("errors==0", "p99<1us"))
    assert run.result.requests > 0 and run.requests == run.result.requests
    assert run.latency_us.p99 is not None and run.per_connection.never_answered == 0
    errors, p99 = run.slo
    assert errors.passed and not p99.passed and p99.measured == run.latency_us.p99
    assert not run.passed  # an objective was missed
    with pytest.raises(ConfigError):
        bench(echo_server.target, slo=("p99<<1",))


def test_echo_server_factory_serves_any_listener(echo_server_factory):
    server = echo_server_factory("tls://127.0.0.1:0", tls_self_signed=True)
    assert server.target.startswith("tls://127.0.0.1:")
    assert probe(server.target, timeout=2, insecure=True).conforms


def test_the_plugin_is_registered_as_an_entry_point():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "socket_echo"]
    assert plugin.value == "socket_echo.testing.plugin"
