"""Logging set-up: text lines in the seed's spirit, or one JSON object per line.

Structured fields travel in ``extra={"fields": {...}}`` and an ``event`` name; the text format
shows the message, the JSON format shows the message plus every field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger("socket_echo")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
_worker: int | None = None  # set in a --workers process: every line says which worker


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        if _worker is not None:
            obj["worker"] = _worker
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = "" if _worker is None else f"[worker {_worker}] "
        handler.setFormatter(
            logging.Formatter(
                TEXT_FORMAT.replace("%(message)s", tag + "%(message)s"), "%Y-%m-%d %H:%M:%S"
            )
        )
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    quiet_aioquic()


def quiet_aioquic() -> None:
    """aioquic logs each connection error to the "quic" logger, which would reach stderr bare
    (Python's last-resort handler), outside our format: the server's close record and the
    tools' one-line errors name it already."""
    quiet = logging.getLogger("quic")
    quiet.handlers[:] = [logging.NullHandler()]
    quiet.propagate = False


def set_worker(index: int, level: str, fmt: str) -> None:
    """In a worker process: tag every line with the worker's number."""
    global _worker
    _worker = index
    setup_logging(level, fmt)


def log_event(level: int, event: str, message: str, **fields: Any) -> None:
    logger.log(level, message, extra={"event": event, "fields": fields})


class RateLimitedLog:
    """Counts occurrences of one condition and logs at most once per ``interval`` seconds,
    with the count since the last line: never a line per event."""

    __slots__ = ("_last", "count", "event", "interval", "level", "message", "pending")

    def __init__(
        self, event: str, message: str, interval: float = 1.0, level: int = logging.WARNING
    ) -> None:
        self.event = event
        self.message = message  # formatted with {count}
        self.interval = interval
        self.level = level
        self.count = 0  # total, for metrics
        self.pending = 0  # since the last line
        self._last = float("-inf")

    def note(self, n: int = 1, **fields: Any) -> None:
        self.count += n
        self.pending += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log_event(
                self.level,
                self.event,
                self.message.format(count=self.pending),
                count=self.pending,
                **fields,
            )
            self.pending = 0
