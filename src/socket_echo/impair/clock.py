"""When an impaired echo may leave: never earlier than asked, as netem's delay is a lower bound.

The event loop's own clock will not do on uvloop: libuv caches its time once per iteration and
counts timers in whole milliseconds from it, so a 20 ms delay measured from ``loop.time()``
came back after 19.3 ms. Here the time is read from the monotonic clock when the data arrives
and again when the timer fires; a timer that fires early is armed again for what is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

now = time.monotonic  # the stdlib loop's clock; uvloop's is this, cached and in whole ms
COARSE = 0.0005  # uvloop rounds to whole ms: asked half a millisecond later, it seldom fires early


def call_when_due(
    loop: asyncio.AbstractEventLoop, due: float, callback: Callable[[], None]
) -> asyncio.TimerHandle:
    """A timer for ``callback`` at ``due`` (of :func:`now`); the callback checks ``now()``
    itself and arms again with this if it came early. On a loop whose clock is cached in
    whole milliseconds (uvloop) the timer is asked half a millisecond later: one that fires
    early costs a second timer, and nearly every one did (the impaired path took 1.3x (TCP)
    and 1.6x (UDP) the server CPU per echo); ?delay=5ms now comes back after 5.3 ms at the
    fastest, 5.5 ms at the median."""
    slack = 0.0 if isinstance(loop, asyncio.BaseEventLoop) else COARSE
    return loop.call_later(max(0.0, due - now()) + slack, callback)
