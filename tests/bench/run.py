"""The project's benchmark: the real chat server (and Debian's redis-server
for comparison) against the C load generator, on loopback, in one run.

    python tests/bench/run.py --suite all
    python tests/bench/run.py --suite throughput [--members 1000,5000]
                              [--publishers 100] [--text-bytes 100]
                              [--seconds 10] [--window 1] [--repeat 1]
    python tests/bench/run.py --suite storm [--members 1000,5000,10000]
    python tests/bench/run.py --suite idle [--members 10000]
    python tests/bench/run.py --suite restart [--members 1000,5000,10000]
                              [--signal KILL|TERM]
    python tests/bench/run.py --suite durable [--fill-events 1000000]

Each suite prints a Markdown table.  Suites:

The chat server keeps its room log in a new SQLite file per start, as it
does by default (``--db memory`` for ``:memory:``); Redis keeps nothing.

* throughput: seated members, publishers keeping --window messages in
  flight; deliveries/s of the chat server and of Redis pub/sub under the same
  load, their ratio, server memory per member, lost messages, evictions.
* storm: N members connect and say hello all at once; time until all are
  welcomed, then until all hear one message, and the server's CPU meanwhile.
* idle: N joined, silent members; the server's CPU over --seconds.
* restart, durable: need the server's --db (see durable.py).

Not part of the test suite: timings belong in a benchmark, not in
assertions.  Only ratios measured in the same run mean anything on a shared
machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import durable
import harness
import idle
from harness import (
    BenchError,
    Loadgen,
    Process,
    build_loadgen,
    evictions,
    raise_fd_limit,
    start_redis,
    start_server,
    table,
)

SUITES = ("throughput", "storm", "idle", "restart", "durable")
DEFAULT_MEMBERS = {"throughput": [1000, 5000], "storm": [1000, 5000, 10000],
                   "idle": [10000], "restart": [1000, 5000, 10000], "durable": [1000]}


def db_args(args: argparse.Namespace) -> list[str]:
    """The chat server's room log as --db chose: a new file each start, or memory."""
    return ["--db=:memory:"] if args.db == "memory" else []


def _start(tmp: Path, proto: str, members: int, server_args: list[str]) -> Process:
    if proto == "chat":
        return start_server(tmp, members, *server_args)
    return start_redis(tmp, members)


def seated_run(binary: Path, tmp: Path, proto: str, members: int, args: argparse.Namespace,
               server_args: list[str] = ()) -> dict:
    """One throughput run against a fresh chat server or Redis.

    Returns the generator's result fields plus the target's memory per
    member (KB, from RSS before any client and once all are seated), CPU
    share of one core while publishing, peak RSS, and evictions.
    """
    target = _start(tmp, proto, members, list(server_args))
    try:
        base_kib = target.rss_kib()
        gen = Loadgen(binary, "throughput", proto, target.port, members,
                      publishers=args.publishers, bytes=args.text_bytes,
                      seconds=args.seconds, window=args.window, timeout=args.timeout, sync=1)
        seated = gen.line("seated")
        seated_kib = target.rss_kib()
        cpu0 = target.cpu()
        gen.go()
        result = gen.line("result")
        cpu = target.cpu() - cpu0
        gen.close()
        if result.get("timed_out"):
            raise BenchError(f"{proto}: only {seated['joined']} of {members} joined "
                             f"in {args.timeout:g} s; load generator: {gen.errors()[-600:]!r}")
        result.update(
            kb_per_member=(seated_kib - base_kib) * 1.024 / members,
            cpu_share=cpu / float(result["seconds"]),
            # Less at the mercy of a busy machine than deliveries/s: what the
            # target spent per delivery, whoever was the bottleneck.
            ns_per_delivery=cpu / max(1, int(result["deliveries"])) * 1e9,
            peak_mib=target.peak_rss_kib() / 1024,
            evictions=evictions(target) if proto == "chat" else int(result["disconnects"]),
        )
        return result
    finally:
        target.stop()


def suite_throughput(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    rows = []
    for members in args.members or DEFAULT_MEMBERS["throughput"]:
        rates: dict[str, list[float]] = {"chat": [], "redis": []}
        for _ in range(args.repeat):
            chat = seated_run(binary, tmp, "chat", members, args, db_args(args))
            redis = seated_run(binary, tmp, "redis", members, args)
            rates["chat"].append(float(chat["deliveries_per_s"]))
            rates["redis"].append(float(redis["deliveries_per_s"]))
            ratio = rates["chat"][-1] / rates["redis"][-1]
            for name, r in (("chat server", chat), ("redis pub/sub", redis)):
                rows.append([members, name, f"{float(r['deliveries_per_s']) / 1e6:.2f} M",
                             f"{ratio:.2f}x" if r is chat else "",
                             f"{r['cpu_share']:.0%}", f"{r['ns_per_delivery']:.0f}",
                             f"{r['kb_per_member']:.1f}",
                             f"{r['peak_mib']:.0f}", r["join_s"], r["lost"], r["evictions"]])
        if args.repeat > 1:
            rows.append(median_row(members, rates["chat"], rates["redis"], "x"))
    return table(f"Seated throughput: {args.publishers} publishers, {args.text_bytes}-byte "
                 f"messages, window {args.window}, {args.seconds:g} s each",
                 ["members", "server", "deliveries/s", "vs redis", "server CPU",
                  "CPU ns/delivery", "KB/member", "peak RSS MiB", "seat s", "lost",
                  "evictions"], rows)


def median_row(members: int, ours: list[float], theirs: list[float], unit: str) -> list:
    """A summary row: medians of alternating runs, and their ratio."""
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = f"{a / b:.2f}x" if unit == "x" else f"{a / b:.0%}"
    return [members, f"median of {len(ours)}", f"{a / 1e6:.2f} M vs {b / 1e6:.2f} M", ratio,
            *[""] * 7]


def storm_run(binary: Path, tmp: Path, proto: str, members: int,
              args: argparse.Namespace) -> dict:
    """All members connect at once: seconds to all welcomed and to all
    hearing one message, with the target's CPU seconds meanwhile."""
    target = _start(tmp, proto, members, db_args(args))
    try:
        cpu0 = target.cpu()
        gen = Loadgen(binary, "storm", proto, target.port, members, timeout=args.timeout)
        seated = gen.line("seated")
        result = gen.line("result")
        gen.close()
        result.update(seated, cpu=target.cpu() - cpu0,
                      evictions=evictions(target) if proto == "chat" else result["disconnects"])
        return result
    finally:
        target.stop()


def suite_storm(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    rows = []
    for members in args.members or DEFAULT_MEMBERS["storm"]:
        seconds: dict[str, list[float]] = {"chat": [], "redis": []}
        for _ in range(args.repeat):
            for proto, name in (("chat", "chat server"), ("redis", "redis pub/sub")):
                r = storm_run(binary, tmp, proto, members, args)
                done = "timed_out" not in r
                seconds[proto].append(float(r["join_s"]) if done else float("inf"))
                rows.append([members, name, f"{r['joined']}/{members}",
                             r["join_s"] if done else f"> {args.timeout:g}",
                             r.get("settled_s", "-"), f"{r['cpu']:.2f}", r["evictions"]])
        if args.repeat > 1:
            rows.append([members, f"median of {args.repeat}", "",
                         f"{statistics.median(seconds['chat']):.3f} vs "
                         f"{statistics.median(seconds['redis']):.3f}", "", "", ""])
    return table("Join storm: all members connect and say hello at once",
                 ["members", "server", "welcomed", "all welcomed s", "all hear a message s",
                  "server CPU s", "evictions"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="throughput",
                        help=f"comma-separated: {', '.join(SUITES)}, or all")
    parser.add_argument("--members", type=lambda s: [int(x) for x in s.split(",")],
                        help="member counts (default per suite)")
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--text-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=1,
                        help="messages each publisher keeps in flight")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on seating and on each restart, seconds")
    parser.add_argument("--db", default="file", choices=["file", "memory"],
                        help="room log of the throughput, storm and idle servers: a new "
                        "SQLite file each (the default server's) or :memory:")
    parser.add_argument("--server-root", type=Path,
                        help="run the chat server from this directory instead (e.g. "
                        "`git archive COMMIT | tar -x -C DIR`), for before-and-after figures")
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM"],
                        help="how the restart suite stops the server")
    parser.add_argument("--fill-events", type=int, default=1_000_000,
                        help="events stored before the durable suite's start-up timing")
    args = parser.parse_args()
    suites = SUITES if args.suite == "all" else args.suite.split(",")
    if args.server_root:
        harness.SERVER_ROOT = args.server_root.resolve()
    raise_fd_limit(max(args.members or [10000]) * 2)
    runners = {"throughput": suite_throughput, "storm": suite_storm, "idle": idle.suite_idle,
               "restart": durable.suite_restart, "durable": durable.suite_durable}
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_loadgen(Path(tmp))
        for suite in suites:
            try:
                print(runners[suite](binary, Path(tmp), args), flush=True)
            except BenchError as exc:
                print(f"\n{suite}: failed: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
