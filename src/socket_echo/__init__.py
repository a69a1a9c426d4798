"""socket-echo: the Zephyr socket echo sample's server in Python, without its limits."""

__version__ = "0.1.0"
