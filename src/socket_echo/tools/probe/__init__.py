"""``socket-echo probe``: run.py dispatches by the target's kind (stream.py: TCP, TLS, Unix,
UDP; quic.py; dtls.py); steps.py holds the verdicts, output.py shows them. Imports nothing."""
