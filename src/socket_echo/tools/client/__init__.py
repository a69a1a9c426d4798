"""``socket-echo client``: run.py dispatches by the target's kind (stream and UDP there, quic.py,
dtls.py). Imports nothing."""
