"""Idle cost: the server's CPU time and memory with no clients, then with
many joined members who say nothing (they answer pings, as clients do).

    python tests/bench/run.py --suite idle [--members 10000] [--seconds 10]

Target (issue 9): 10,000 joined, silent members cost under 1% of a core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import Loadgen, start_server, table

# Joins and their notices are still being flushed just after the last welcome.
SETTLE_S = 2.0


def suite_idle(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    """Run with the server's default timers; return a table."""
    rows = []
    for members in args.members or [10000]:
        server = start_server(tmp, members, *(["--db=:memory:"] if args.db == "memory" else []))
        try:
            cpu0 = server.cpu()
            time.sleep(args.seconds)
            rows.append(["0", f"{(server.cpu() - cpu0) / args.seconds:.2%}",
                         f"{server.rss_kib() / 1024:.1f}", "-"])
            gen = Loadgen(binary, "hold", "chat", server.port, members,
                          timeout=args.timeout + args.seconds + 30)
            seated = gen.line("seated")
            time.sleep(SETTLE_S)
            cpu0 = server.cpu()
            time.sleep(args.seconds)
            cpu = server.cpu() - cpu0
            rows.append([f"{seated['joined']}/{members}", f"{cpu / args.seconds:.2%}",
                         f"{server.rss_kib() / 1024:.1f}", seated["join_s"]])
            gen.close()
        finally:
            server.stop()
    return table(f"Idle: server CPU over {args.seconds:g} s (share of one core)",
                 ["silent members", "server CPU", "RSS MiB", "seat s"], rows)
