"""A TLS 1.2 client of mbedTLS itself, for tests: python-mbedtls bundles mbedTLS 2.28, the line
Zephyr uses. Run as a process of its own: after a server's handshake alert, python-mbedtls'
do_handshake() has been seen to block for ever, ignoring the socket's timeout.

    python mbedtls_client.py PORT SUITE HEX_PAYLOAD         -> prints the echo as hex, exit 0
    python mbedtls_client.py --dtls PORT SUITE HEX [HEX...] -> DTLS 1.2: one record per payload,
                                                               each echo on a line as hex
"""

from __future__ import annotations

import socket
import sys

from mbedtls import tls as mbed


def dtls(port: int, suite: str, payloads: list[bytes]) -> int:
    """net-tools' dtls-client in miniature: mbedTLS's DTLS client (cookie exchange and
    retransmissions are mbedTLS's own), one record per payload, each echo one record."""
    conf = mbed.DTLSConfiguration(
        validate_certificates=False,
        ciphers=(suite,),
        lowest_supported_version=mbed.DTLSVersion.DTLSv1_2,
        highest_supported_version=mbed.DTLSVersion.DTLSv1_2,
    )
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    sock = mbed.ClientContext(conf).wrap_socket(raw, server_hostname="localhost")
    echoes = []
    try:
        sock.do_handshake()
        for payload in payloads:
            sock.send(payload)
            echoes.append(sock.recv(65536))
    except Exception as exc:  # reported to the test as one line
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    for echo in echoes:
        print(echo.hex())
    return 0


def main() -> int:
    if sys.argv[1] == "--dtls":
        return dtls(int(sys.argv[2]), sys.argv[3], [bytes.fromhex(h) for h in sys.argv[4:]])
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
