"""A stand-in for the event loop's clock and callbacks, for logic tests in-process (as trio's
autojump_clock): time moves only when a test says so, and timers fire in order. It stands in
for the platform (the loop), never for the code under test."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class FakeHandle:
    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, int, FakeHandle]] = []
        self.readers: dict[int, Callable[[], Any]] = {}
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeHandle:
        handle = FakeHandle(self.now + delay, callback, args)
        heapq.heappush(self.timers, (handle.when, next(self._order), handle))
        return handle

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def pending(self) -> list[FakeHandle]:
        return [h for _, _, h in self.timers if not h.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer that falls due on the way, in order."""
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            when, _, handle = heapq.heappop(self.timers)
            self.now = when
            if not handle.cancelled:
                handle.callback(*handle.args)
        self.now = end
