"""A conformance check's steps and their verdicts: what probe, quic_probe, dtls_probe and
the report share (a leaf: it imports none of them)."""

from __future__ import annotations

import dataclasses
from typing import Any

PASS, FAIL, FINDING, SKIP = "pass", "fail", "finding", "skip"


@dataclasses.dataclass
class Step:
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
