"""What a connection passes before the echo: the PROXY header (proxy.py, a sans-IO parser;
proxy_gate.py, its two gates), the TLS handshake (tls.py), and the wiring that chains them per
listener kind (wiring.py). Later: QUIC and DTLS."""
