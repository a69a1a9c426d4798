"""atheris (libFuzzer) target for the PROXY protocol header parser.

    make fuzz                      # FUZZ_SECONDS=300 by default
    python tests/fuzz_proxy.py CORPUS_DIR -max_total_time=60

The properties, checked on every input: ``parse`` returns a header, None (needs more bytes)
or raises its own ProxyHeaderError, nothing else; a header never claims more bytes than it
was given, and parsing exactly those bytes gives the same header (it never read past it);
a prefix of a complete header is never an error (it only needs more bytes).
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from socket_echo.gates.proxy import ProxyHeaderError, build_v1, build_v2, parse


def check(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is None:
        return
    assert 0 < header.length <= len(data), header
    assert parse(data[: header.length]) == header, header
    for cut in range(header.length):
        try:
            partial = parse(data[:cut])
        except ProxyHeaderError:
            continue  # a v1 line can look wrong before its end; v2 never should
        assert partial is None or partial == header, (cut, partial)


def write_seeds(folder: str) -> None:
    """Valid headers of each kind, for the fuzzer to mutate."""
    os.makedirs(folder, exist_ok=True)
    seeds = [
        build_v1(("192.0.2.1", 56324), ("192.0.2.2", 4242)),
        build_v1(("2001:db8::1", 56324), ("2001:db8::2", 4242)),
        b"PROXY UNKNOWN\r\n",
        build_v2(("192.0.2.1", 56324), ("192.0.2.2", 4242)),
        build_v2(("2001:db8::1", 56324), ("2001:db8::2", 4242), tlvs=b"\x04\x00\x01x"),
        build_v2(None),
    ]
    for i, seed in enumerate(seeds):
        with open(os.path.join(folder, f"seed-{i}"), "wb") as f:
            f.write(seed + b"payload")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
