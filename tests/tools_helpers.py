"""Starting the broken servers and running the client tools as a user would."""

from __future__ import annotations

import subprocess
import sys
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
