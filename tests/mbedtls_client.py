"""A TLS 1.2 client of mbedTLS itself, for tests: python-mbedtls bundles mbedTLS 2.28, the line
Zephyr uses. Run as a process of its own: after a server's handshake alert, python-mbedtls'
do_handshake() has been seen to block for ever, ignoring the socket's timeout.

    python mbedtls_client.py PORT SUITE HEX_PAYLOAD    -> prints the echo as hex, exit 0
"""

from __future__ import annotations

import socket
import sys

from mbedtls import tls as mbed


def main() -> int:
    port, suite, payload = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
    conf = mbed.TLSConfiguration(
        validate_certificates=False,
        ciphers=(suite,),
        lowest_supported_version=mbed.TLSVersion.TLSv1_2,
        highest_supported_version=mbed.TLSVersion.TLSv1_2,
    )
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock = mbed.ClientContext(conf).wrap_socket(raw, server_hostname="localhost")
    try:
        sock.do_handshake()
        sock.send(payload)
        got = b""
        while len(got) < len(payload):
            part = sock.recv(4096)
            if not part:
                break
            got += part
    except Exception as exc:  # reported to the test as one line
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    print(got.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
