"""The connecting layer the three tools share: targets and their sockets (target.py), sending
and receiving at once (duplex.py), the payload pattern (patterns.py), the QUIC and DTLS client
sides (quic.py, dtls.py). Imports nothing."""
