"""The tools' defaults and bounds, once: cli.py shows them, bench/model.BenchConfig holds
them, and the C ping-pong's twins of some are held equal by tests/test_shared_constants.py. A
leaf that imports nothing (cli.py reads it at every start, the server's too)."""

MODES = ("pingpong", "stream", "churn", "udp")  # bench --mode over tcp://, unix://, udp://
ARRIVALS = ("uniform", "poisson")
DEFAULT_CONNECTIONS = 50
DEFAULT_SIZE = 64
DEFAULT_STREAM_SIZE = 65536
DEFAULT_DURATION = 10.0
DEFAULT_TIMEOUT = 5.0
DEFAULT_DRAIN_TIMEOUT = 2.0  # bench's end: echo still owed is read this long, then reset
DEFAULT_IN_FLIGHT = 16  # open loop: requests in flight per connection at most
MAX_IN_FLIGHT = 4096  # ... and its bound (bench/_native.c: the same)
MAX_SIZE = 65536  # bench --size at most (bench/_native.c: the same)
MAX_SEGMENTS = 10_000  # bench --segment I/N: N at most (report refuses a file claiming more)
LATE_SEND_US = 10  # a send this much after its slot, with room to go, was late (ours)
ASYNC_LATE_SEND_US = 1000  # ... in the asyncio loops (QUIC, DTLS): their timers' grain
BEHIND_US = 100  # sends this late (or later) ...
BEHIND_SHARE = 0.01  # ... over this share of all: the generator fell behind (a warning)
# client and probe: a byte sent is due back within --timeout plus the time the bytes still
# owed ahead of it take at this rate (B/s): a slow serial link's pace, so a step's deadline is
# timeout + size / ECHO_FLOOR_RATE whatever the peer does (a 1 B/s trickle held it for ever)
ECHO_FLOOR_RATE = 32 << 10
UDP_TIMEOUT = 1.0  # bench --mode udp: a datagram not answered by then counts as lost, sent anew
CHECK_EVERY = 0.1  # bench: timeouts looked for, progress shown this often (C: CHECK_EVERY_US)
SPIN_US = 200  # bench's open loop polls (does not sleep) the last this-many us before a slot
MIN_EFFECT = 0.05  # report --compare: a significant difference under this share is not counted
