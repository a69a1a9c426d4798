"""What bench sends: payloads that differ per request, the one owner of the pattern (the C
ping-pong, bench/_native.c, computes the same bytes from the same buffer and constants; a test
holds them equal)."""

from __future__ import annotations

PATTERN_PERIOD = 251  # a prime: runs of the pattern do not line up with message sizes
SEQUENCE_STRIDE = 7  # ping-pong message n of worker w starts at (n * 7 + w) % 251


class Patterns:
    """Payloads that differ per request, so a server answering with an old message or with
    another client's is caught: ``message(seed)`` is bytes (seed + i) mod PATTERN_PERIOD,
    sliced from one buffer made once (no per-byte work)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.base = bytes(i % PATTERN_PERIOD for i in range(size + PATTERN_PERIOD))

    def message(self, seed: int) -> bytes:
        start = seed % PATTERN_PERIOD
        return self.base[start : start + self.size]


def pingpong_seed(seq: int, worker: int) -> int:
    """The seed of ping-pong message ``seq`` of worker ``worker`` (C: ``message()``)."""
    return seq * SEQUENCE_STRIDE + worker
