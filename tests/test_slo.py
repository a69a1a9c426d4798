"""--slo on bench and report: objectives parsed before any load (one line, exit 2), judged on
the run, or on report's exactly merged histograms, with an exit code of their own (3)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli
from test_report_input import encoded, result, write

from socket_echo.tools.bench.merge import merge
from socket_echo.tools.bench.result_file import load
from socket_echo.tools.bench.slo import parse


def test_expressions_and_their_units():
    assert parse("p99<2ms").figure == "p99" and parse("p99<2ms").value == 2000
    assert parse("p99.9<=10ms").figure == "p999"
    assert parse("p50<=500us").value == 500 and parse("max<1s").value == 1e6
    assert parse("errors==0").figure == "errors"
    assert parse("late_sends<1%").value == 1.0
    assert parse("rps>=20000").op == ">="


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("p99<<2ms", "give FIGURE OP VALUE"),
        ("p99<2", "a latency needs a unit"),
        ("late_sends<1", "in %"),
        ("errors==0ms", "takes no unit"),
        ("speed>1", "is not a figure"),
    ],
)
def test_a_malformed_objective_is_one_line_before_any_load(expr, words):
    assert_one_line_error(run_cli("bench", "127.0.0.1:9", "--slo", expr), 2, words)


def test_bench_judges_its_objectives_and_a_miss_is_exit_3(shared_server):
    server = shared_server()
    target = f"127.0.0.1:{server.port}"
    missed = run_cli("bench", target, "-c", "2", "-d", "0.3", "-p", "1", "--json", "-",
                     "--slo", "p99<1us", "--slo", "errors==0")  # fmt: skip
    assert missed.returncode == 3, missed.stderr
    report = json.loads(missed.stdout)
    p99, errors = report["slo"]
    assert p99 == {"objective": "p99<1us", "measured": report["latency_us"]["p99"],
                   "passed": False}  # fmt: skip
    assert errors["passed"] is True and errors["measured"] == 0
    assert "slo p99<1us:" in missed.stderr and "MISSED" in missed.stderr
    kept = run_cli("bench", target, "-c", "1", "-d", "0.3", "-p", "1", "--slo", "p99<10s")
    assert kept.returncode == 0, kept.stderr


def test_report_judges_the_exactly_merged_histograms(tmp_path):
    """Two segments whose p99s are each under the objective can merge over it (or the other
    way): the objective is judged on the sum, the figure k6 cannot give across instances."""
    fast = result(2, index=0, count=2, texts=[encoded(1), encoded(2)])
    slow = result(2, index=1, count=2, texts=[encoded(3), encoded(4)])
    paths = [write(tmp_path, fast, "a.json"), write(tmp_path, slow, "b.json")]
    merged = merge([(p, load(p)) for p in paths])
    p99 = merged.latency_us.p99
    assert p99 is not None
    over = run_cli("report", *paths, "--json", "-", "--slo", f"p99<{p99}us")
    assert over.returncode == 3, over.stderr
    (verdict,) = json.loads(over.stdout)["slo"]
    assert verdict == {"objective": f"p99<{p99}us", "measured": p99, "passed": False}
    under = run_cli("report", *paths, "--slo", f"p99<={p99}us")
    assert under.returncode == 0, under.stderr


def test_a_segment_scope_holds_only_when_every_segment_meets_it(tmp_path):
    """p99<X@segment: each result given to report, before they are added; the worst segment
    is the measured value and the ones that missed are named (the merge alone could hide a
    slow node among fast ones)."""
    fast = result(2, index=0, count=2, texts=[encoded(1), encoded(2)])
    slow = result(2, index=1, count=2, texts=[encoded(3), encoded(4)])
    paths = [write(tmp_path, fast, "a.json"), write(tmp_path, slow, "b.json")]
    each = {p: load(p).latency_us.p99 for p in paths}
    worst, best = max(each.values()), min(each.values())  # type: ignore[type-var]
    missed = run_cli("report", *paths, "--json", "-", "--slo", f"p99<{worst}us@segment")
    assert missed.returncode == 3, missed.stderr
    (verdict,) = json.loads(missed.stdout)["slo"]
    assert verdict["measured"] == worst and verdict["passed"] is False
    assert verdict["missed_by"] == [p for p in paths if each[p] == worst]
    assert "missed by" in missed.stderr
    kept = run_cli("report", *paths, "--slo", f"p99<={worst}us@segment")
    assert kept.returncode == 0, kept.stderr
    assert best is not None


def test_a_responder_scope_judges_each_member_of_a_group(tmp_path):
    from socket_echo.tools.bench.slo import parse

    data = result(2)
    data["responders"] = [
        {"address": "198.51.100.11", "answered": 100, "lost": 0, "histogram": encoded(1)},
        {"address": "198.51.100.12", "answered": 90, "lost": 10, "histogram": encoded(3)},
    ]
    r = load(write(tmp_path, data))
    p99 = {m.address: m.latency_us.p99 for m in r.responders}
    slowest = max(p99, key=lambda a: p99[a] or 0)
    v = parse(f"p99<{p99[slowest]}us@responder").judge(r)
    assert not v.passed and v.missed_by == (slowest,) and v.measured == p99[slowest]
    assert parse(f"p99<={p99[slowest]}us@responder").judge(r).passed
    lost = parse("lost_datagrams==0@responder").judge(r)
    assert not lost.passed and lost.missed_by == ("198.51.100.12",)
    assert parse("responders>=2").judge(r).passed and not parse("responders>=3").judge(r).passed
    assert not parse("p99<1s@responder").judge(load(write(tmp_path, result(2), "n.json"))).passed


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("p99<2ms@node", "no scope"),
        ("rps>1@responder", "not rps"),
        ("errors==0@responder", "not"),
        ("p99<2ms@responder", "is for a multicast group target"),
    ],
)
def test_a_malformed_scope_is_one_line(expr, words):
    assert_one_line_error(run_cli("bench", "127.0.0.1:9", "--slo", expr), 2, words)
