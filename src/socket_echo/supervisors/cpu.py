"""How many workers ``--workers auto`` means: the usable cores, capped by a cgroup CPU quota.

Paths are parameters so tests can give a fake cgroup tree (tests/test_supervisor_logic.py).
"""

from __future__ import annotations

import math
import os

from socket_echo.config import PROCESSES_AT_LEAST, PROCESSES_PER_CORE, ConfigError

CGROUP_ROOT = "/sys/fs/cgroup"


def cpu_count(root: str = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's ``--cpus`` or a Kubernetes CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_quota(root)
    return max(1, min(cores or 1, math.ceil(quota) if quota else cores or 1))


def cgroup_quota(root: str = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup allows (quota / period), None when unlimited or unknown.
    cgroup v2: ``cpu.max`` = "QUOTA PERIOD" or "max PERIOD"; v1: ``cpu/cpu.cfs_quota_us``
    (-1 = unlimited) over ``cpu/cpu.cfs_period_us``."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = f.read().strip()
        if quota == "-1":
            return None
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = f.read().strip()
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def worker_count(text: str) -> int:
    """``auto`` = the usable cores (cpu_count); else a positive integer."""
    if text == "auto":
        return cpu_count()
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--workers {text!r}: expected a positive number or 'auto'")
    check_process_count("--workers", n)
    return n


def max_processes() -> int:
    """The most processes a count may ask for: PROCESSES_PER_CORE per usable core (and
    PROCESSES_AT_LEAST however few the cores). More
    only contend for the same cores, and a typo (100000) would fork until the machine
    stalls."""
    return max(PROCESSES_AT_LEAST, PROCESSES_PER_CORE * cpu_count())


def check_process_count(flag: str, n: int) -> int:
    """``--workers`` and bench's ``--processes``: ConfigError past :func:`max_processes`,
    before anything forks."""
    bound = max_processes()
    if n > bound:
        raise ConfigError(
            f"{flag} {n}: at most {bound} here ({PROCESSES_PER_CORE} per usable core, "
            f"{cpu_count()} usable)"
        )
    return n
