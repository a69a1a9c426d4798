"""bench's histograms: HdrHistogram at one range and precision (1 us to an hour, 3 significant
digits), made from counts, encoded as V2 text (what a result carries), decoded only after
their header was checked (a file's histogram is input from anywhere: HdrHistogram would size
its counts from the header and inflate the payload without a limit), and added."""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from collections import Counter

from hdrh.histogram import HdrHistogram

from socket_echo.tools.bench.result import DIGITS, HIGHEST_US, LOWEST_US, ResultError
from socket_echo.tools.bench.result import iterate as iterate  # its one place is result.py

MAX_HISTOGRAM_TEXT = 1 << 20  # base64 of a full histogram is ~300 KB
_EXTERNAL = struct.Struct(">II")  # cookie, length (HdrHistogram V2, base64-wrapped)
_PAYLOAD = struct.Struct(">IIIIQQd")  # cookie, length, offset, digits, lowest, highest, ratio
_COMPRESSED_COOKIE, _ENCODING_COOKIE = 0x1C849304, 0x1C849303  # V2, lower nibble masked
_COUNTS_LEN = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS).counts_len
_MAX_PAYLOAD = _PAYLOAD.size + 9 * _COUNTS_LEN  # LEB128/ZigZag: at most 9 bytes a counter


def histogram(counts: Counter[int] | None = None) -> HdrHistogram:
    hist = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    for us, n in (counts or {}).items():
        hist.record_value(min(max(LOWEST_US, us), HIGHEST_US), n)
    return hist


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode("ascii"))


def decode(text: object, where: str) -> HdrHistogram:
    """A V2 histogram of bench's range and precision (its header checked before anything is
    allocated from it: result_file.check_histogram); ResultError naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise ResultError(f"{where}: not an HdrHistogram (a {type(text).__name__})")
    check_histogram(text, where)
    try:
        return HdrHistogram.decode(text.encode("ascii"))
    except Exception as exc:  # hdrh raises its own kinds (cookie, length) besides base64's
        raise ResultError(f"{where}: not an HdrHistogram ({exc or type(exc).__name__})") from None


def add_encoded(into: HdrHistogram, text: str, where: str) -> None:
    """Decode, add, drop: one decoded histogram alive at a time."""
    into.add(decode(text, where))


def check_histogram(text: str, where: str) -> None:
    """A V2 histogram of bench's range and precision, its payload inflating to no more than
    such a histogram holds: checked before HdrHistogram allocates anything from it."""
    if len(text) > MAX_HISTOGRAM_TEXT:
        raise ResultError(f"{where}: not an HdrHistogram ({len(text):,} characters)")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise ResultError(f"{where}: not an HdrHistogram (not base64)") from None
    if len(raw) < _EXTERNAL.size:
        raise ResultError(f"{where}: not an HdrHistogram (too short)")
    cookie, length = _EXTERNAL.unpack_from(raw)
    if cookie & ~0xF0 != _COMPRESSED_COOKIE or length != len(raw) - _EXTERNAL.size:
        raise ResultError(f"{where}: not an HdrHistogram (not V2 compressed)")
    inflate = zlib.decompressobj()
    try:
        payload = inflate.decompress(raw[_EXTERNAL.size :], _MAX_PAYLOAD)
    except zlib.error:
        raise ResultError(f"{where}: not an HdrHistogram (its payload does not inflate)") from None
    if inflate.unconsumed_tail or len(payload) < _PAYLOAD.size:
        raise ResultError(f"{where}: not an HdrHistogram (its payload has the wrong size)")
    cookie, _, _, digits, lowest, highest, _ = _PAYLOAD.unpack_from(payload)
    if cookie & ~0xF0 != _ENCODING_COOKIE:
        raise ResultError(f"{where}: not an HdrHistogram (not V2 encoded)")
    if (lowest, highest, digits) != (LOWEST_US, HIGHEST_US, DIGITS):
        raise ResultError(
            f"{where}: an HdrHistogram of {lowest}..{highest} at {digits} digits, not bench's "
            f"{LOWEST_US}..{HIGHEST_US} at {DIGITS}: it does not add"
        )
