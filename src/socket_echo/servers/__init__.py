"""Kinds served by a server of their own on the listener's UDP socket, not by a stream data
path: quic.py (aioquic) and dtls.py (pyOpenSSL over dtls_wire.py). Imports nothing."""
