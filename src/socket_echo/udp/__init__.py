"""UDP echo (RFC 862) data paths: native.py (recvmmsg/sendmmsg and the guard in C,
_native.c), mmsg.py (recvmmsg/sendmmsg through ctypes, Linux), loop.py (recvfrom/sendto, any
platform); guard.py decides whom to answer (and has a C twin for the native path)."""
