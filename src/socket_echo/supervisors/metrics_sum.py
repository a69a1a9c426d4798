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


def sum_metrics(texts: Iterable[str]) -> list[Metric]:
    """The sum over workers of every series (counters, gauges and histogram buckets alike:
    each is a sum over connections)."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            acc = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                acc[key] = acc.get(key, 0.0) + sample.value
    for name, metric in families.items():
        for (sample_name, labels), value in sums[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


async def answers(path: str, timeout: float) -> bool:
    """Whether a worker answers its /healthz within ``timeout`` (a SIGSTOPped one does not)."""
    return await scrape(path, timeout, "/healthz") == "ok\n"


async def render(
    ready_workers: int, restarts: int, metrics_paths: Iterable[str], last: dict[str, str]
) -> bytes:
    """The supervisor's /metrics body: its own counts and the workers' sums. A worker that
    does not answer in time counts with its last scrape (``last``, by path, kept here), so
    summed counters never go backwards (Prometheus would read a counter reset), and is
    counted as stale."""
    paths = list(metrics_paths)
    texts = await asyncio.gather(*(scrape(path) for path in paths))
    stale = 0
    for path, text in zip(paths, texts, strict=True):
        if text:
            last[path] = text
        elif path in last:
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
    registry.register(_Fixed(own + sum_metrics(last[p] for p in paths if p in last)))
    return generate_latest(registry)
