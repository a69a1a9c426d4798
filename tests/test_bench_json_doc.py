"""docs/bench-json.md documents bench's JSON result: held to the model (every key of a result,
of its parameters and of a spectrum is named there), so the page cannot fall behind."""

from __future__ import annotations

import dataclasses
import pathlib
import re

from socket_echo.tools.bench.result import FORMAT, BenchResult, Flow, Parameters, Spectrum

DOC = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench-json.md").read_text()


def named(key: str) -> bool:
    return re.search(rf"`{re.escape(key)}`", DOC) is not None


def test_every_key_of_a_result_is_documented():
    keys = {"format", "latency_resolution_us", "latency_significant_digits"}
    keys |= {f.name for f in dataclasses.fields(BenchResult)}
    keys |= {f.name for f in dataclasses.fields(Parameters)}
    keys |= {f.name for f in dataclasses.fields(Spectrum)}
    keys |= {f.name for f in dataclasses.fields(Flow)}
    keys |= {"start", "end", "seconds", "index", "count", "merged", "t"}
    missing = sorted(k for k in keys if not named(k))
    assert not missing, missing
    assert f'"format": "{FORMAT}"' in DOC
