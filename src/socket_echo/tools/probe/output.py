"""How probe shows its steps: a rich table on a terminal, plain lines in a pipe, or JSON."""

from __future__ import annotations

import json
import sys

from socket_echo.tools.probe.steps import FAIL, FINDING, PASS, SKIP, Step

MARK = {PASS: "✓ pass", FAIL: "✗ FAIL", FINDING: "! finding", SKIP: "- skip"}
STYLE = {PASS: "green", FAIL: "bold red", FINDING: "yellow", SKIP: "dim"}


def probe_json(target: str, steps: list[Step]) -> str:
    return json.dumps(
        {
            "target": target,
            "passed": all(s.status != FAIL for s in steps),
            "findings": [s.detail for s in steps if s.status == FINDING],
            "steps": [
                {
                    "name": s.name,
                    "status": s.status,
                    "detail": s.detail,
                    "seconds": round(s.seconds, 6),
                    **s.data,
                }
                for s in steps
            ],
        },
        indent=2,
    )


def probe_table(target: str, steps: list[Step]) -> None:
    failed = sum(s.status == FAIL for s in steps)
    findings = sum(s.status == FINDING for s in steps)
    verdict = (f"{failed} step(s) failed" if failed else "conforms") + (
        f", {findings} finding(s)" if findings else ""
    )
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"socket-echo probe {target}", title_justify="left")
        for column in ("step", "result", "detail", "time"):
            table.add_column(column)
        for s in steps:
            table.add_row(
                s.name,
                f"[{STYLE[s.status]}]{MARK[s.status]}[/]",
                s.detail,
                f"{s.seconds * 1000:.1f} ms",
            )
        console = Console()
        console.print(table)
        console.print(f"[{'bold red' if failed else 'green'}]{verdict}[/]")
        return
    print(f"socket-echo probe {target}")
    for s in steps:
        print(f"{MARK[s.status]:<10} {s.name:<32} {s.detail}")
    print(verdict)
