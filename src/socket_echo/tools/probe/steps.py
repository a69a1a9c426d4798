"""A conformance check's steps and their verdicts: what probe's stream.py, quic.py, dtls.py
and output.py share (a leaf: it imports none of them)."""

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
