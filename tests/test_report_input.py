"""``socket-echo report`` against hostile results files: every field checked on load in one
place (one line naming the file and the field, exit 2, never a traceback), every count a file
can claim bounded before any work is sized by it, and memory proportional to one histogram per
figure, not to the seconds a run lasted. In process (result_file.load, stats.merge) except
where the one line and the exit code are the behaviour."""

from __future__ import annotations

import base64
import json
import random
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, run_cli
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

from socket_echo.tools.bench.merge import coverage_note, merge
from socket_echo.tools.bench.result import FORMAT, ResultError
from socket_echo.tools.bench.result_file import load
from socket_echo.tools.defaults import MAX_SEGMENTS


def encoded(seed: int, values: int = 50) -> str:
    rng = random.Random(seed)
    hist = HdrHistogram(1, 3_600_000_000, 3)
    for _ in range(values):
        hist.record_value(rng.randint(20, 5000), rng.randint(1, 9))
    return str(hist.encode().decode("ascii"))


def result(seconds: int = 3, index: int = 0, count: int = 1, texts: list[str] | None = None,
           start: float = 1_700_000_000.0) -> dict[str, Any]:  # fmt: skip
    texts = texts or [encoded(i) for i in range(seconds)]
    return {
        "format": FORMAT, "target": "tcp://127.0.0.1:4242", "mode": "pingpong",
        "requests": 100 * seconds, "requests_per_second": 100.0, "megabytes_per_second": 0.01,
        "latency_from": "send", "histogram": texts[0], "errors": 0, "error_kinds": {},
        "mismatches": 0, "sends": 0, "late_sends": 0, "held_sends": 0,
        "client_cpu_percent": 5.0, "client_spin_percent": 1.0, "client_saturated": False,
        "window": {"start": start, "end": start + seconds, "seconds": float(seconds)},
        "segment": {"index": index, "count": count},
        "parameters": {"connections": 2, "size": 64, "duration": float(seconds),
                       "processes": 1, "rate": None, "segment": f"{index}/{count}"},
        "per_second": [{"t": start + i, "requests": 100, "histogram": texts[i % len(texts)]}
                       for i in range(seconds)],
    }  # fmt: skip


def write(tmp_path: Path, data: Any, name: str = "r.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def refused(tmp_path: Path, data: Any, *words: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ResultError) as caught:
        load(path)
    message = str(caught.value)
    assert path in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def spoiled(change: Any) -> dict[str, Any]:
    data = result()
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(requests=10**400), ["requests", "a huge number is outside"]),
        (lambda d: d.update(errors=-5), ["errors", "-5 is outside"]),
        (lambda d: d.update(mismatches=1.5), ["mismatches", "a whole number expected"]),
        (lambda d: d.update(requests_per_second=1e300), ["requests_per_second", "outside"]),
        (lambda d: d.update(target=["tcp://a:1"]), ["target", "text expected, not a list"]),
        (lambda d: d.update(mode="warp"), ["mode", "'warp' is none of"]),
        (lambda d: d.update(segment={"index": 5, "count": 2}), ["segment.index", "0..1"]),
        (lambda d: d.update(segment={"index": -1, "count": 0}), ["segment.count", "outside"]),
        (lambda d: d.update(segment={"index": 0, "count": 10**8}), ["segment.count", "10,000"]),
        (lambda d: d["window"].update(seconds=-1), ["window.seconds", "outside"]),
        (lambda d: d.update(client_saturated="no"), ["client_saturated", "true or false"]),
        (lambda d: d.update(error_kinds={"timeout": -1}), ["error_kinds.timeout", "outside"]),
        (lambda d: d["parameters"].update(size=0), ["parameters.size", "outside"]),
        (lambda d: d["parameters"].update(extra={"a": 1}), ["parameters.extra", "a scalar"]),
        (lambda d: d["per_second"][1].update(requests=None), ["per_second[1].requests"]),
        (lambda d: d["per_second"][0].pop("t"), ["no 't' in per_second[0]"]),
        (lambda d: d.update(per_second={"t": 1}), ["per_second", "a list expected"]),
        (lambda d: d.update(under_load={"rate": 1}), ["no 'histogram' in under_load"]),
    ],
)
def test_a_field_out_of_its_type_or_range_is_named(tmp_path, change, words):
    refused(tmp_path, spoiled(change), *words)


def test_json_that_python_reads_but_a_result_cannot_hold(tmp_path):
    text = json.dumps(result()).replace('"requests": 300', '"requests": NaN')
    refused(tmp_path, text, "NaN is not a number")
    refused(tmp_path, "[" * 100_000 + "]" * 100_000, "nested too deep")
    refused(tmp_path, json.dumps(result()).replace('"errors": 0', '"errors": ' + "9" * 5000))


def histogram_claiming(lowest: int, highest: int, digits: int, inflated: int = 0) -> str:
    """A V2 histogram whose header claims this range (HdrHistogram sizes its counts from it)
    and whose payload inflates to ``inflated`` bytes of counts."""
    header = struct.pack(">IIIIQQd", 0x1C849313, inflated, 0, digits, lowest, highest, 1.0)
    payload = zlib.compress(header + b"\x00" * inflated)
    return base64.b64encode(struct.pack(">II", 0x1C849314, len(payload)) + payload).decode()


def test_a_histogram_is_checked_before_anything_is_allocated_from_it(tmp_path):
    huge_range = histogram_claiming(1, 2**62, 5)  # counts for this: gigabytes
    refused(tmp_path, spoiled(lambda d: d.update(histogram=huge_range)), "does not add")
    bomb = histogram_claiming(1, 3_600_000_000, 3, inflated=50 << 20)  # 50 MiB of zeros
    refused(tmp_path, spoiled(lambda d: d.update(histogram=bomb)), "wrong size")
    refused(tmp_path, spoiled(lambda d: d.update(histogram="@@@")), "not base64")
    refused(tmp_path, spoiled(lambda d: d.update(histogram=7)), "not an HdrHistogram (a int)")


def test_the_file_size_is_bounded_before_it_is_read(tmp_path, monkeypatch):
    from socket_echo.tools.bench import result_file

    monkeypatch.setattr(result_file, "MAX_FILE_BYTES", 1000)
    refused(tmp_path, result(), "more than a results file holds")


def test_a_claimed_segment_count_costs_nothing_to_report(tmp_path):
    """ "count": 100000000 in a 2 KB file took 12 GB and 32 s (the list of missing segments);
    past MAX_SEGMENTS it is refused, and up to it the missing ones are told as ranges."""
    t = time.perf_counter()
    path = write(tmp_path, result(index=17, count=MAX_SEGMENTS))
    merged = merge([(path, load(path))])
    note = coverage_note(merged)
    assert note is not None and note.startswith(f"{MAX_SEGMENTS - 1:,}".replace(",", ""))
    assert f"0-16, 18-{MAX_SEGMENTS - 1}" in note
    assert time.perf_counter() - t < 5  # generous: the old list was O(count) in Python


def test_merging_long_results_holds_one_histogram_per_figure(tmp_path):
    """Per-second histograms were all kept decoded (~190 KB each: 714 MB for an hour of one
    file). Four files of 600 s each now peak at a few histograms' worth: decode, add, drop."""
    texts = [encoded(i) for i in range(40)]
    paths = [
        write(tmp_path, result(600, index=i, count=4, texts=texts[i * 10 :]), f"r{i}.json")
        for i in range(4)
    ]
    tracemalloc.start()
    try:
        merged = merge([(p, load(p)) for p in paths])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(merged.per_second) == 600
    assert merged.requests == 4 * 600 * 100
    assert sum(s.requests for s in merged.per_second) == merged.requests
    # 600 decoded seconds would be ~110 MiB; the files' text and a few histograms are < 40
    assert peak < 40 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_a_merge_has_every_field_a_run_has(tmp_path):
    """A merge is a BenchResult as a run is (one typed model): its JSON has every key a run's
    has, client_spin_percent included (a merge of three segments lacked it)."""
    one = result()
    paths = [write(tmp_path, one, "a.json"), write(tmp_path, one, "b.json")]
    merged = merge([(p, load(p)) for p in paths]).to_dict()
    single = load(paths[0]).to_dict()
    assert set(merged) == set(single), set(merged) ^ set(single)
    assert merged["client_spin_percent"] == 1.0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(requests=10**400), "requests"),
        (lambda d: d.update(errors=-5), "errors"),
        (lambda d: d.update(target=["x"]), "target"),
    ],
)
def test_report_says_it_in_one_line_exit_2(tmp_path, change, words):
    path = write(tmp_path, spoiled(change))
    assert_one_line_error(run_cli("report", path), 2, path, words)


def test_a_groups_members_add_by_address_across_segments(tmp_path):
    """report of two segments of a multicast run: each member's counts and histograms added,
    a member only one segment saw kept as it was; a malformed member is one line."""
    from socket_echo.tools.bench.merge import merge

    def member(address: str, answered: int, lost: int, seed: int) -> dict[str, Any]:
        return {"address": address, "answered": answered, "lost": lost, "duplicates": 1,
                "reordered": 0, "first_s": 0.1, "last_s": 2.0,
                "histogram": encoded(seed)}  # fmt: skip

    a = result(2, index=0, count=2)
    a["responders"] = [member("198.51.100.11", 100, 0, 1), member("198.51.100.12", 90, 10, 2)]
    b = result(2, index=1, count=2)
    b["responders"] = [member("198.51.100.11", 50, 5, 3)]
    merged = merge([(p, load(p)) for p in (write(tmp_path, a, "a.json"),
                                           write(tmp_path, b, "b.json"))])  # fmt: skip
    by = {m.address: m for m in merged.responders}
    assert (by["198.51.100.11"].answered, by["198.51.100.11"].lost) == (150, 5)
    assert by["198.51.100.11"].duplicates == 2 and by["198.51.100.12"].answered == 90
    assert [m.address for m in merged.responders] == ["198.51.100.11", "198.51.100.12"]
    bad = result(2)
    bad["responders"] = [{"address": "x"}]
    refused(tmp_path, bad, "responders[0]")


@settings(max_examples=15, deadline=None)  # hdrh's iterator, the reference, is the slow one
@given(st.dictionaries(st.integers(1, 2_000_000), st.integers(1, 10**6), max_size=60))
def test_iterate_reads_the_counts_as_hdrhs_recorded_iterator_does(values):
    """histograms.iterate reads the counts array at once; it must say what hdrh's (slow)
    recorded iterator says, bucket for bucket."""
    from collections import Counter

    from socket_echo.tools.bench.histograms import histogram, iterate

    hist = histogram(Counter(values))
    expected = [
        (int(v.value_iterated_to), int(v.count_at_value_iterated_to))
        for v in hist.get_recorded_iterator()
    ]
    assert iterate(hist) == expected


@settings(max_examples=15, deadline=None)
@given(st.dictionaries(st.integers(1, 100_000_000), st.integers(1, 10**6), max_size=60))
def test_a_spectrum_is_what_hdrh_says_of_the_same_histogram(values):
    """Spectrum.of reads the buckets once; each percentile, the mean, min and max must be
    hdrh's own answer (get_value_at_percentile, get_mean_value: its slow walks)."""
    from collections import Counter

    from socket_echo.tools.bench.histograms import histogram
    from socket_echo.tools.bench.result import PERCENTILES, Spectrum

    hist = histogram(Counter(values))
    spectrum = Spectrum.of(hist)
    if not values:
        assert spectrum == Spectrum()
        return
    for name, p in PERCENTILES.items():
        assert spectrum[name] == hist.get_value_at_percentile(p), name
    assert spectrum.mean == round(hist.get_mean_value(), 1)
    assert (spectrum.min, spectrum.max) == (hist.get_min_value(), hist.get_max_value())
