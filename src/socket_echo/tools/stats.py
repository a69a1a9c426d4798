"""bench's figures: the workers' counts made into one summary (the JSON ``--json`` writes and
the table shows), and summaries of several runs added into one (``socket-echo report``).

Latency is kept as HdrHistogram keeps it (1 us to an hour, 3 significant digits: exact to the
microsecond below 1 ms, within 0.1 % above), and the JSON carries the histograms themselves,
HdrHistogram V2-encoded (base64), for the whole window and for each second of it: adding
histograms is exact, so N segments merged are one run, not an average of percentiles.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

from hdrh.histogram import HdrHistogram

from socket_echo.tools.bench_model import BenchConfig, WorkerResult
from socket_echo.tools.defaults import BEHIND_SHARE, BEHIND_US, LATE_SEND_US

LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3
PERCENTILES = {
    "p50": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9,
    "p9999": 99.99, "p99999": 99.999,
}  # fmt: skip
SATURATED = 0.90  # a worker busier than this measured itself, not the server
FORMAT = "socket-echo bench 2"  # the JSON's "format": what report reads


class ResultError(ValueError):
    """A results file report cannot read, or results that cannot be added; one line."""


def histogram(counts: Counter[int] | None = None) -> HdrHistogram:
    hist = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    for us, n in (counts or {}).items():
        hist.record_value(min(max(LOWEST_US, us), HIGHEST_US), n)
    return hist


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode("ascii"))


def decode(text: object, where: str) -> HdrHistogram:
    if not isinstance(text, str):
        raise ResultError(f"{where}: not an HdrHistogram (a {type(text).__name__})")
    try:
        hist = HdrHistogram.decode(text.encode("ascii"))
    except Exception as exc:  # hdrh raises its own kinds (cookie, length) besides base64's
        raise ResultError(f"{where}: not an HdrHistogram ({exc or type(exc).__name__})") from None
    out = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    out.add(hist)
    return out


def spectrum(hist: HdrHistogram) -> dict[str, Any]:
    """p50 ... p99.999, max, min, mean in microseconds (None when nothing was measured)."""
    keys = [*PERCENTILES, "max", "min", "mean"]
    if not hist.get_total_count():
        return dict.fromkeys(keys, None)
    out: dict[str, Any] = {k: hist.get_value_at_percentile(p) for k, p in PERCENTILES.items()}
    out["max"] = hist.get_max_value()
    out["min"] = hist.get_min_value()
    out["mean"] = round(hist.get_mean_value(), 1)
    return out


def behind(lateness: HdrHistogram, sends: int) -> bool:
    """Whether the generator fell behind its schedule: over BEHIND_SHARE of the sends left
    BEHIND_US or more after their slot (a few microseconds late is the machine's noise and is
    counted in late_sends; this is the one that moves the figures)."""
    if not sends:
        return False
    above = sum(n for value, n in iterate(lateness) if value >= BEHIND_US)
    return above > BEHIND_SHARE * sends


def iterate(hist: HdrHistogram) -> list[tuple[int, int]]:
    """(value, count) of every recorded bucket."""
    return [
        (int(v.value_iterated_to), int(v.count_at_value_iterated_to))
        for v in hist.get_recorded_iterator()
    ]


def latency_fields(
    corrected: HdrHistogram,
    uncorrected: HdrHistogram | None,
    lateness: HdrHistogram | None,
    sends: int,
) -> dict[str, Any]:
    """The latency part of a summary, one run's or merged: the spectra and the histograms
    (``uncorrected`` and ``lateness`` are the open loop's, None for a closed loop)."""
    return {
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected) if uncorrected else None,
        "latency_resolution_us": 1,
        "latency_significant_digits": DIGITS,
        "send_lateness_us": spectrum(lateness) if lateness else None,
        "generator_behind": behind(lateness, sends) if lateness else False,
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected) if uncorrected else None,
        "histogram_lateness": encode(lateness) if lateness else None,
        "_histogram": corrected,
    }


def flow_fields(
    rate: float, size: int, requests: int, errors: int, mismatches: int,
    corrected: HdrHistogram, uncorrected: HdrHistogram,
) -> dict[str, Any]:  # fmt: skip
    """The latency-under-load flow's figures (``under_load``), one run's or merged."""
    return {
        "rate": rate,
        "size": size,
        "requests": requests,
        "errors": errors,
        "mismatches": mismatches,
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected),
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected),
    }


def summarize(cfg: BenchConfig, results: list[WorkerResult]) -> dict[str, Any]:
    """One run's summary, from what each worker process brought back."""
    from socket_echo.tools.advice import explain_losses

    probes = [r for r in results if r.probe]
    results = [r for r in results if not r.probe]
    corrected = histogram()
    uncorrected = histogram()
    lateness: Counter[int] = Counter()
    seconds: list[Counter[int]] = []
    errors: Counter[str] = Counter()
    for r in results:
        corrected.add(histogram(r.latency_us))
        uncorrected.add(histogram(r.uncorrected_us))
        lateness.update(r.lateness_us)
        for i, second in enumerate(r.per_second):
            while len(seconds) <= i:
                seconds.append(Counter())
            seconds[i].update(second)
        errors.update(r.errors)
    measured = [r for r in results if r.measured_from]
    start = min((r.measured_from for r in measured), default=0.0)
    elapsed = max((r.elapsed for r in results), default=0.0) or 1e-9
    requests = sum(r.requests for r in results)
    if requests == 0 and not errors:
        errors["no request was answered"] += 1
    cpu = sum(r.cpu_seconds for r in results)
    spun = sum(r.spun_seconds for r in results)
    busiest = max(
        ((r.cpu_seconds - r.spun_seconds) / r.elapsed for r in results if r.elapsed), default=0.0
    )  # polling for the next slot is CPU kept on purpose, not load
    sends = sum(r.sends for r in results)
    late_sends = sum(r.late_sends for r in results)
    lost = sum(r.lost for r in results)
    connections, rate = cfg.share
    open_loop = bool(cfg.rate) and cfg.mode == "pingpong"
    summary: dict[str, Any] = {
        "format": FORMAT,
        "target": cfg.target.url,
        "mode": cfg.mode,
        "requests": requests,
        "requests_per_second": requests / elapsed,
        "megabytes_per_second": sum(r.bytes for r in results) / elapsed / 1e6,
        "latency_from": "intended send time (corrected)" if open_loop else "send",
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            histogram(lateness) if open_loop else None,
            sends,
        ),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "mismatches": sum(r.mismatches for r in results),
        "lost_datagrams": lost,
        "late_datagrams": sum(r.late for r in results),
        "duplicate_datagrams": sum(r.duplicates for r in results),
        "sends": sends,
        "late_sends": late_sends,
        "held_sends": sum(r.held_sends for r in results),
        "late_send_threshold_us": LATE_SEND_US,
        "client_cpu_percent": 100 * cpu / elapsed / max(1, len(results)),  # per process
        "client_spin_percent": 100 * spun / elapsed / max(1, len(results)),  # of that, polling
        "client_saturated": busiest >= SATURATED,
        "window": {"start": start, "end": start + elapsed, "seconds": elapsed},
        "segment": {"index": cfg.segment[0], "count": cfg.segment[1]},
        "parameters": {
            "connections": connections,
            "size": cfg.size,
            "duration": cfg.duration,
            "processes": cfg.processes,
            "rate": rate or None,
            "timeout": cfg.timeout,
            "arrival": cfg.arrival if open_loop else None,
            "warmup": cfg.warmup,
            "in_flight": cfg.in_flight if open_loop else 1,
            "start_at": cfg.start_at,
            "segment": f"{cfg.segment[0]}/{cfg.segment[1]}",
        },
        "per_second": [
            {"t": start + i, "requests": sum(s.values()), "histogram": encode(histogram(s))}
            for i, s in enumerate(seconds)
        ],
    }
    summary["loss_explanation"] = explain_losses(cfg, requests, lost, elapsed)
    summary["under_load"] = under_load(cfg, probes) if cfg.probe_rate else None
    return summary


def under_load(cfg: BenchConfig, probes: list[WorkerResult]) -> dict[str, Any]:
    """The ping-pong flow measured while the load ran (iperf2's --bounceback-congest)."""
    corrected, uncorrected = histogram(), histogram()
    for r in probes:
        corrected.add(histogram(r.latency_us))
        uncorrected.add(histogram(r.uncorrected_us))
    return flow_fields(
        cfg.probe_rate,
        cfg.probe().size,
        sum(r.requests for r in probes),
        sum(sum(r.errors.values()) for r in probes),
        sum(r.mismatches for r in probes),
        corrected,
        uncorrected,
    )


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=2)


# -- report: results added ------------------------------------------------------------------
SAME = ("target", "mode")  # results of different targets, modes or sizes do not add


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """A field a results file lacks, or holds in the wrong form: one line naming the file."""
    try:
        yield
    except ResultError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ResultError(f"{path}: not a bench result ({what})") from None


def load(path: str) -> dict[str, Any]:
    """One results file, checked enough to be added; ResultError (one line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeError) as exc:
        raise ResultError(
            f"{path}: not a bench result (malformed or truncated JSON: {exc})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultError(f'{path}: not a bench result of this version (no "format": "{FORMAT}")')
    with reading(path):
        data["_histogram"] = decode(data["histogram"], path)
        data["_segment"] = (int(data["segment"]["index"]), int(data["segment"]["count"]))
        data["_window"] = (float(data["window"]["start"]), float(data["window"]["seconds"]))
        int(data["parameters"]["size"]) + int(data["parameters"]["connections"])
        data["target"] + data["mode"]  # both text
    data["_path"] = path
    return data


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Results added: histograms added, counters and rates summed, the window the common one.
    ResultError when they are not of one target, mode and size, one segment comes twice, or
    a file holds a field in a form that does not add (one line naming it)."""
    first = results[0]
    for r in results[1:]:
        for key in SAME:
            if r[key] != first[key]:
                raise ResultError(
                    f"{r['_path']}: {key} {r[key]!r}, not {first[key]!r} as in {first['_path']}: "
                    "results of different runs do not add"
                )
        if r["parameters"]["size"] != first["parameters"]["size"]:
            raise ResultError(
                f"{r['_path']}: size {r['parameters']['size']}, not "
                f"{first['parameters']['size']} as in {first['_path']}"
            )
    seen: dict[tuple[int, int], str] = {}
    for r in results:
        seg = r["_segment"]
        if seg in seen and seg[1] > 1:
            raise ResultError(f"{r['_path']}: segment {seg[0]}/{seg[1]} is also {seen[seg]}")
        seen[seg] = r["_path"]
    corrected, uncorrected, lateness = histogram(), histogram(), histogram()
    open_loop = False
    seconds: dict[int, tuple[int, HdrHistogram]] = {}
    errors: Counter[str] = Counter()
    params = dict(first["parameters"])
    summed = ("connections", "processes")
    counted = (
        "requests", "requests_per_second", "megabytes_per_second", "errors", "mismatches",
        "lost_datagrams", "late_datagrams", "duplicate_datagrams", "sends", "late_sends",
        "held_sends",
    )  # fmt: skip
    rate_keys = ("requests_per_second", "megabytes_per_second")  # summed as they are
    totals: dict[str, float] = dict.fromkeys(counted, 0.0)
    param_totals: Counter[str] = Counter()
    rates, segments, cpu, flows = [], [], [], []
    for r in results:
        with reading(r["_path"]):
            corrected.add(r["_histogram"])
            if r.get("histogram_uncorrected"):
                open_loop = True
                uncorrected.add(decode(r["histogram_uncorrected"], r["_path"]))
            if r.get("histogram_lateness"):
                lateness.add(decode(r["histogram_lateness"], r["_path"]))
            for s in r.get("per_second") or []:
                t = round(float(s["t"]))
                n, h = seconds.get(t, (0, histogram()))
                h.add(decode(s["histogram"], r["_path"]))
                seconds[t] = (n + int(s["requests"]), h)
            for key in counted:
                totals[key] += float(r.get(key) or 0)
            errors.update({str(k): int(v) for k, v in (r.get("error_kinds") or {}).items()})
            for key in summed:
                param_totals[key] += int(r["parameters"].get(key) or 0)
            rates.append(r["parameters"].get("rate"))
            segments.append(str(r["parameters"].get("segment", "0/1")))
            cpu.append(float(r.get("client_cpu_percent") or 0))
            if r.get("under_load"):
                flow = r["under_load"]
                flows.append(
                    (
                        float(flow["rate"]), int(flow["size"]), int(flow["requests"]),
                        int(flow["errors"]), int(flow["mismatches"]),
                        decode(flow["histogram"], r["_path"]),
                        decode(flow["histogram_uncorrected"], r["_path"]),
                    )
                )  # fmt: skip
    start = max(r["_window"][0] for r in results)
    end = min(r["_window"][0] + r["_window"][1] for r in results)
    params.update(param_totals)
    params["rate"] = sum(rates) if all(rates) else None
    params["segment"] = ",".join(sorted(segments))
    whole = {k: v if k in rate_keys else int(v) for k, v in totals.items()}
    merged: dict[str, Any] = {
        "format": FORMAT,
        "target": first["target"],
        "mode": first["mode"],
        **{k: whole[k] for k in ("requests", "requests_per_second", "megabytes_per_second")},
        "latency_from": first.get("latency_from", "send"),
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            lateness if open_loop else None,
            int(whole["sends"]),
        ),
        "error_kinds": dict(errors),
        **{k: whole[k] for k in counted[3:]},
        "late_send_threshold_us": first.get("late_send_threshold_us", LATE_SEND_US),
        "client_cpu_percent": max(cpu),
        "client_saturated": any(r.get("client_saturated") for r in results),
        "window": {"start": start, "end": end, "seconds": max(0.0, end - start)},
        "segment": {
            "index": None,
            "count": first["_segment"][1],
            "merged": sorted(i for i, _ in seen),
        },
        "parameters": params,
        "per_second": [
            {"t": float(t), "requests": n, "histogram": encode(h)}
            for t, (n, h) in sorted(seconds.items())
        ],
        "loss_explanation": None,
        "under_load": merge_flows(flows),
    }
    return merged


def merge_flows(
    flows: list[tuple[float, int, int, int, int, HdrHistogram, HdrHistogram]],
) -> dict[str, Any] | None:
    if not flows:
        return None
    corrected, uncorrected = histogram(), histogram()
    for flow in flows:
        corrected.add(flow[5])
        uncorrected.add(flow[6])
    return flow_fields(
        sum(f[0] for f in flows),
        flows[0][1],
        sum(f[2] for f in flows),
        sum(f[3] for f in flows),
        sum(f[4] for f in flows),
        corrected,
        uncorrected,
    )


def coverage_note(merged: dict[str, Any]) -> str | None:
    """What the merge lacks or where the windows differ, in one line (None: nothing)."""
    count = merged["segment"]["count"]
    have = merged["segment"]["merged"]
    missing = [i for i in range(count) if i not in have] if count > 1 else []
    notes = []
    if missing:
        notes.append(f"segments {', '.join(map(str, missing))} of {count} are missing")
    seconds = merged["window"]["seconds"]
    if not math.isfinite(seconds) or seconds < 0.9 * float(merged["parameters"]["duration"]):
        notes.append(
            f"the runs overlap for {max(0.0, seconds):.1f} s of {merged['parameters']['duration']}"
            " (start them together: --start-at)"
        )
    return "; ".join(notes) or None
