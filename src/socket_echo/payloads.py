"""The payload set Zephyr's net-tools ``echo-client`` sends, as Zephyr documents it
(same shapes and sizes: one letter, a word, four bytes with 0xff and NUL inside, a 25-byte
sentence, 1500 bytes of text, one NUL byte, 256 bytes of binary). Used by ``probe`` and the
tests, so a server that passes here passes the tool embedded developers already use."""

from __future__ import annotations

_TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    b"exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. "
)

NET_TOOLS_PAYLOADS: tuple[tuple[str, bytes], ...] = (
    ("letter", b"A"),
    ("word", b"foobar"),
    ("binary 4 B", b"\x20\xff\x00\x56"),
    ("sentence 25 B", b"The quick brown fox jumps"),
    ("text 1500 B", (_TEXT * (1500 // len(_TEXT) + 1))[:1500]),
    ("NUL byte", b"\x00"),
    ("binary 256 B", bytes(range(256))),
)
