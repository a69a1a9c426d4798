"""``socket-echo bench`` and ``report``. Imports nothing."""
