"""Starting the broken servers and running the client tools as a user would."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Broken:
    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "broken_servers.py"), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("PORT"), line
        self.port = int(line.split()[1])

    def lines(self, n: int, timeout: float = 15.0) -> list[str]:
        """The next ``n`` lines the server prints (a witness: how each connection ended)."""
        import select

        assert self.proc.stdout is not None
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            assert ready, f"only {out} within {timeout} s"
            out.append(self.proc.stdout.readline().strip())
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def tool(
    *args: str, stdin: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """conftest.run_cli with bytes in and out (what the client tools pipe)."""
    from conftest import run_cli

    result: subprocess.CompletedProcess[bytes] = run_cli(
        *args, env=env, timeout=timeout, input=stdin, text=False
    )
    return result
