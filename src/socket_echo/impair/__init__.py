"""Impairments a listener applies on purpose, for testing a device's stack against a bad path:
params.py (the URL query, parsed and checked), stream.py (delay, jitter, rate, reset or close
after N bytes, on stream listeners), datagram.py (delay, jitter, drop, duplicate on UDP).
Unimpaired listeners never touch this package: their data paths are unchanged."""
