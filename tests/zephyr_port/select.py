"""MicroPython's Zephyr port builds at the BASIC feature level, where there is no ``select``
module (MICROPY_PY_SELECT is off; and its sockets have no poll ioctl either). On the path of
the emulated board (tests/zephyr_port), importing it fails as it does there."""

raise ImportError("no module named 'select'")
