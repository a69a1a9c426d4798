"""The supervisor's ``/metrics``: every worker's series summed, plus the workers' own counts.

Workers serve their metrics on private Unix sockets. Scraping them runs on the supervisor's
event loop, concurrently and each within ``SCRAPE_TIMEOUT``: a hung worker (SIGSTOP) costs
that one scrape a timeout and nothing else; ``/readyz``, signal forwarding and child reaping
go on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from socket_echo.config import SCRAPE_TIMEOUT


async def scrape(path: str, timeout: float = SCRAPE_TIMEOUT, what: str = "/metrics") -> str:
    """One worker's /metrics text (or ``what``) over its private Unix socket; "" if it does
    not answer within ``timeout``."""

    async def fetch() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(f"GET {what} HTTP/1.0\r\n\r\n".encode())
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        data = await asyncio.wait_for(fetch(), timeout)
    except (OSError, asyncio.TimeoutError):
        return ""
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else ""


KEPT_TYPES = ("counter", "histogram", "summary")  # what a dead worker's sum keeps; not gauges

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class Sums:
    """Series summed by family: (sample name, labels) -> value, with each family's metadata."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[str, dict[SampleKey, float]] = {}

    def add(self, text: str, types: tuple[str, ...] | None = None) -> None:
        """Add a scrape's text (only families of ``types``, when given)."""
        for family in text_string_to_metric_families(text):
            if types is not None and family.type not in types:
                continue
            if family.name not in self.families:
                self.families[family.name] = Metric(family.name, family.documentation, family.type)
                self.values[family.name] = {}
            acc = self.values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                acc[key] = acc.get(key, 0.0) + sample.value

    def merged(self, other: Sums) -> Sums:
        out = Sums()
        for sums in (self, other):
            for name, family in sums.families.items():
                out.families.setdefault(name, family)
                acc = out.values.setdefault(name, {})
                for key, value in sums.values[name].items():
                    acc[key] = acc.get(key, 0.0) + value
        return out

    def metrics(self) -> list[Metric]:
        out = []
        for name, family in self.families.items():
            metric = Metric(name, family.documentation, family.type)
            for (sample_name, labels), value in self.values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            out.append(metric)
        return out


def sum_metrics(texts: Iterable[str]) -> list[Metric]:
    """The sum over workers of every series (counters, gauges and histogram buckets alike:
    each is a sum over connections)."""
    sums = Sums()
    for text in texts:
        sums.add(text)
    return sums.metrics()


class WorkerTotals:
    """What the supervisor's /metrics adds up: each worker's last scrape (by its metrics
    path) and what workers that died had counted. A worker killed or restarted takes its
    gauges with it but leaves its counters and histograms in the sum (prometheus_client's
    multiprocess mode keeps a dead process's counters for the same reason), so a summed
    counter never decreases while the supervisor lives; what a worker counted after its last
    scrape is not seen. A restart of the supervisor itself starts every counter from 0: a
    counter reset, which Prometheus' rate() and increase() handle."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}
        self.retired = Sums()

    def retire(self, path: str) -> None:
        """The worker behind ``path`` died: keep its counters, drop its gauges."""
        text = self.last.pop(path, None)
        if text:
            self.retired.add(text, KEPT_TYPES)

    def metrics(self, paths: Iterable[str]) -> list[Metric]:
        live = Sums()
        for path in paths:
            if path in self.last:
                live.add(self.last[path])
        return live.merged(self.retired).metrics()


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


async def answers(path: str, timeout: float) -> bool:
    """Whether a worker answers its /healthz within ``timeout`` (a SIGSTOPped one does not)."""
    return await scrape(path, timeout, "/healthz") == "ok\n"


async def render(
    ready_workers: int, restarts: int, metrics_paths: Iterable[str], totals: WorkerTotals
) -> bytes:
    """The supervisor's /metrics body: its own counts and the workers' sums. A worker that
    does not answer in time counts with its last scrape (kept in ``totals``), so summed
    counters never go backwards (Prometheus would read a counter reset), and is counted as
    stale; one that died counts with what it had counted (WorkerTotals.retire)."""
    paths = list(metrics_paths)
    texts = await asyncio.gather(*(scrape(path) for path in paths))
    stale = 0
    for path, text in zip(paths, texts, strict=True):
        if text:
            totals.last[path] = text
        elif path in totals.last:
            stale += 1
    own: list[Metric] = [
        GaugeMetricFamily("socket_echo_workers", "Worker processes ready.", value=ready_workers),
        GaugeMetricFamily(
            "socket_echo_workers_stale",
            "Workers that did not answer this scrape: their last scrape is summed instead.",
            value=stale,
        ),
        CounterMetricFamily(
            "socket_echo_worker_restarts",
            "Worker processes restarted after they died.",
            value=restarts,
        ),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(own + totals.metrics(paths)))
    return generate_latest(registry)
