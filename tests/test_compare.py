"""report --compare: an A/B verdict per figure, with its interval, on real runs: a server that
answers 20 ms later is worse on every latency figure and on requests/s; a run against itself
is no difference; --fail-on-regression exits 3; the flags' mistakes are one line."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_one_line_error, run_cli

from socket_echo.tools.bench.compare import SAME, WORSE, judge


def bench_json(target: str, path: str) -> None:
    done = run_cli("bench", target, "-c", "2", "-d", "1.5", "-p", "1", "--json", path)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One plain and one ?delay=20ms listener of one server, a 1.5 s run against each. 20 ms,
    not 1: with six test runners on two cores the plain side's p99.9 reached 6 ms, and the
    verdict on that tail was rightly "no significant difference"."""
    from conftest import ServerProcess

    tmp = tmp_path_factory.mktemp("ab")
    server = ServerProcess(
        ["--bind", "tcp://127.0.0.1:0", "--bind", "tcp://127.0.0.1:0?delay=20ms"],
        expect_listeners=2,
    )
    try:
        (_, _, plain), (_, _, delayed) = server.listeners_of("tcp")
        files = {"plain": str(tmp / "plain.json"), "delayed": str(tmp / "delayed.json")}
        bench_json(f"127.0.0.1:{plain}", files["plain"])
        bench_json(f"127.0.0.1:{delayed}", files["delayed"])
    finally:
        server.kill()
    return files


def verdicts(stdout: str) -> dict[str, dict[str, object]]:
    comparison = json.loads(stdout)["comparison"]
    return {f["name"]: f for f in comparison["figures"]}


def test_a_delayed_server_is_worse_on_every_latency_figure(runs):
    done = run_cli("report", runs["delayed"], "--compare", runs["plain"], "--json", "-")
    assert done.returncode == 0, done.stderr  # a regression alone does not fail the run
    figures = verdicts(done.stdout)
    for name in ("p50", "p90", "p99", "p99.9"):
        f = figures[name]
        assert f["verdict"] == WORSE, f
        assert f["low"] > 1 and f["ratio"] > 1.05, f  # type: ignore[operator]
    assert figures["requests/s"]["verdict"] == WORSE  # closed loop: slower answers, fewer
    assert figures["errors"]["verdict"] == SAME
    assert "A/B: new/base" in done.stderr and "worse" in done.stderr


def test_the_reverse_is_better_and_a_regression_can_fail_the_build(runs):
    better = run_cli("report", runs["plain"], "--compare", runs["delayed"], "--json", "-")
    assert better.returncode == 0, better.stderr
    assert verdicts(better.stdout)["p50"]["verdict"] == "better"
    failed = run_cli("report", runs["delayed"], "--compare", runs["plain"],
                     "--fail-on-regression")  # fmt: skip
    assert failed.returncode == 3, failed.stderr
    kept = run_cli("report", runs["plain"], "--compare", runs["delayed"], "--fail-on-regression")
    assert kept.returncode == 0, kept.stderr


def test_a_run_against_itself_is_no_difference(runs):
    done = run_cli("report", runs["plain"], "--compare", runs["plain"], "--json", "-")
    assert done.returncode == 0, done.stderr
    for f in verdicts(done.stdout).values():
        assert f["verdict"] == SAME and f["ratio"] == 1.0, f
        assert f["low"] <= 1 <= f["high"], f  # type: ignore[operator]


def test_the_plot_draws_both_sides(runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ab.png"
    done = run_cli("report", runs["delayed"], "--compare", runs["plain"], "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_verdict_needs_significance_and_size():
    assert judge(1.20, 1.10, 1.30, 0.05, higher_is_better=False) == WORSE
    assert judge(1.20, 0.95, 1.30, 0.05, higher_is_better=False) == SAME  # not significant
    assert judge(1.03, 1.01, 1.05, 0.05, higher_is_better=False) == SAME  # too small
    assert judge(0.80, 0.70, 0.90, 0.05, higher_is_better=True) == WORSE  # fewer req/s
    assert judge(0.80, 0.70, 0.90, 0.05, higher_is_better=False) == "better"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--fail-on-regression",), "need --compare"),
        (("--compare", "x.json", "--min-effect", "nan"), "--min-effect"),
        (("--compare", "x.json", "--min-effect", "-1"), "--min-effect"),
    ],
)
def test_the_flags_mistakes_are_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path / "new.json"), *args), 2, words)


def runs_scaled(tmp_path, scales: list[float], start: float) -> list:
    """One synthetic run per scale: 3 identical seconds (nothing varies within a run), its
    latencies the same shape times the scale (runs differ as a VM's phases make them)."""
    from hdrh.histogram import HdrHistogram
    from test_report_input import result, write

    from socket_echo.tools.bench.result_file import load

    out = []
    for k, scale in enumerate(scales):
        hist = HdrHistogram(1, 3_600_000_000, 3)
        for us in range(100, 400, 6):
            hist.record_value(int(us * scale), 10)
        text = str(hist.encode().decode("ascii"))
        data = result(3, texts=[text], start=start + 100 * k)
        out.append(load(write(tmp_path, data, f"run{start}-{k}.json")))
    return out


def test_runs_that_differ_from_one_another_widen_the_interval(tmp_path):
    """Seconds alone would call a 20 % difference between two runs significant (nothing
    varies within either). Three runs a side that differ among themselves (10 % in logs),
    shifted by 2.2 standard errors: a bootstrap over three runs is too narrow (it would say
    worse); Welch's small-sample interval, which the verdict takes where it is wider, is not."""
    from socket_echo.tools.bench.compare import compare

    one = compare(
        runs_scaled(tmp_path, [1.0], 0), runs_scaled(tmp_path, [1.2], 10_000), resamples=200
    )
    assert {f.name: f.verdict for f in one.figures}["p50"] == WORSE
    spread = (0.0, 0.1, -0.1)
    base = runs_scaled(tmp_path, [math.exp(x) for x in spread], 20_000)
    new = runs_scaled(tmp_path, [math.exp(x + 0.18) for x in spread], 30_000)
    three = compare(base, new, resamples=200)
    assert three.base_runs == three.new_runs == 3
    p50 = {f.name: f for f in three.figures}["p50"]
    assert p50.verdict == SAME and p50.low is not None and p50.low < 1 < p50.ratio, p50  # type: ignore[operator]
    shifted = compare(
        base, runs_scaled(tmp_path, [math.exp(x + 0.6) for x in spread], 40_000), resamples=200
    )
    assert {f.name: f.verdict for f in shifted.figures}["p50"] == WORSE  # a real shift still is
