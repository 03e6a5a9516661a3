"""The multi-node benchmark: one room on one embedded node, on one Redis-backed
node, and on two Redis-backed nodes, in one run.

    python tests/bench/cluster.py [--members 1000] [--publishers 100]
                                  [--seconds 10] [--rate 20000] [--window 24]
                                  [--repeat 3]

For each setup, on fresh processes (Debian's redis-server with appendonly
fsync'd every second, as the demo runs it; the embedded node keeps its room
in a new SQLite file, the default):

* closed loop (the C load generator's throughput mode: publisher i keeps
  --window messages in flight, sending again when member i hears one):
  deliveries/s, each node's CPU per delivery, Redis's CPU per event;
* paced: publishers in turn, --rate deliveries/s in total (--rate/members
  messages/s), on a fixed schedule: p50/p99 of every delivery's latency
  (send to receipt, measured by the generator), each node's CPU per
  delivery (CPU seconds from /proc/PID/stat over its deliveries from its
  own /metrics, chat_deliveries_total), and Redis's CPU per published event.

With two nodes, odd-numbered members (and so half the publishers) use the
second node.  Then the publish ceiling of the room's Redis script
(tcpserver.redisscripts.PUBLISH, by EVALSHA from redis-benchmark, pipelined, 1
and 10 events per call as a node sends a turn's events): events/s one
room's Redis path accepts, and Redis CPU per event.

Every run is bounded in time and count; processes are stopped by PID.  No
figure is asserted: this machine is shared, so only ratios measured in the
same run mean much.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import (
    BenchError,
    Loadgen,
    Process,
    build_loadgen,
    free_port,
    raise_fd_limit,
    start_server,
    table,
)

from tcpserver.redisscripts import PUBLISH

SETUPS = ("embedded", "redis x1", "redis x2")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
# redis-benchmark requests per ceiling run, at 1 event each; fewer with more.
CEILING_EVENTS = 300_000
# Stream entries kept during the ceiling run (MAXLEN ~): bounds Redis's memory.
CEILING_RETAIN = 100_000


class Room:
    """The processes of one setup; ``stop`` ends them all by PID."""

    def __init__(self, tmp: Path, setup: str, members: int) -> None:
        self.redis: Process | None = None
        self.nodes: list[Process] = []
        try:
            extra = []
            if setup != "embedded":
                self.redis = start_redis(tmp, members)
                extra = [f"--redis=redis://127.0.0.1:{self.redis.port}/0", "--room=bench"]
            for i in range(2 if setup == "redis x2" else 1):
                node = start_server(tmp, members, "--metrics-port=0", *extra,
                                    log_name=f"node{i}-{time.monotonic_ns()}.log")
                # Logged before "listening on", which start_server waited for.
                node.metrics_url = node._wait_for(_METRICS.pattern, 30).group(1)
                self.nodes.append(node)
        except BaseException:
            self.stop()
            raise

    def second_port(self) -> dict[str, int]:
        """The generator's port2 option: the second node's port, if any."""
        return {"port2": self.nodes[1].port} if len(self.nodes) > 1 else {}

    def sample(self) -> dict:
        """CPU seconds of every process, deliveries of every node."""
        return {"cpu": [n.cpu() for n in self.nodes],
                "deliveries": [scrape(n.metrics_url, "chat_deliveries_total")
                               for n in self.nodes],
                "redis_cpu": self.redis.cpu() if self.redis else 0.0}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()


def start_redis(tmp: Path, members: int) -> Process:
    """redis-server as the demo runs it (appendonly, fsync every second)."""
    if not shutil.which("redis-server"):
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    data = tmp / f"redis-{port}"
    data.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
            "--dir", str(data), "--tcp-backlog", "4096", "--maxclients", str(members + 1000)]
    redis = Process(argv, tmp / f"redis-{port}.log", r"Ready to accept connections")
    redis.port = port
    return redis


def scrape(url: str, name: str) -> float:
    """One unlabelled sample from a node's /metrics."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise BenchError(f"{name} not in {url}")


def run(binary: Path, tmp: Path, setup: str, args: argparse.Namespace, rate: float = 0) -> dict:
    """One load run on a fresh room; the generator's fields plus per-node
    CPU per delivery (microseconds) and Redis CPU per published event."""
    room = Room(tmp, setup, args.members)
    try:
        options = dict(publishers=args.publishers, bytes=args.text_bytes, seconds=args.seconds,
                       window=args.window, timeout=args.timeout, sync=1, **room.second_port())
        if rate:
            options["rate"] = rate / args.members  # messages/s: each reaches every member
        gen = Loadgen(binary, "throughput", "chat", room.nodes[0].port, args.members, **options)
        gen.line("seated")
        before = room.sample()
        gen.go()
        result = gen.line("latency") if rate else {}
        result.update(gen.line("result"))
        after = room.sample()
        gen.close()
    finally:
        room.stop()
    result["cpu_us_per_delivery"] = [
        1e6 * (c1 - c0) / max(d1 - d0, 1)
        for c0, c1, d0, d1 in zip(before["cpu"], after["cpu"], before["deliveries"],
                                  after["deliveries"])]
    result["redis_us_per_event"] = (1e6 * (after["redis_cpu"] - before["redis_cpu"])
                                    / max(int(result["published"]), 1))
    return result


def ceiling(tmp: Path, batch: int, text_bytes: int) -> tuple[float, float]:
    """Events/s the PUBLISH script accepts with ``batch`` events per call,
    and Redis CPU microseconds per event."""
    if not shutil.which("redis-benchmark"):
        raise BenchError("redis-benchmark is not installed (apt-get install redis-tools)")
    redis = start_redis(tmp, 100)
    try:
        cli = ["redis-cli", "-p", str(redis.port)]
        keys = [f"chatroom:{{bench}}:{k}" for k in ("epoch", "seq", "stream")]
        subprocess.run([*cli, "SET", keys[0], "bench-epoch"], check=True, capture_output=True,
                       timeout=30)
        sha = subprocess.run([*cli, "SCRIPT", "LOAD", PUBLISH], check=True, capture_output=True,
                             text=True, timeout=30).stdout.strip()
        prefix = '{"type":"message","seq":'
        suffix = (f',"from":"m1@127.0.0.1","text":"{"x" * text_bytes}",'
                  '"ts":1795834800123}')
        requests = CEILING_EVENTS // batch
        cpu0 = redis.cpu()
        out = subprocess.run(
            ["redis-benchmark", "-p", str(redis.port), "-c", "20", "-P", "16",
             "-n", str(requests), "--csv", "EVALSHA", sha, "3", *keys, "bench-epoch",
             str(CEILING_RETAIN), *[prefix, suffix] * batch],
            check=True, capture_output=True, text=True, timeout=300).stdout
        cpu = redis.cpu() - cpu0
        # The test name holds the arguments, quotes unescaped: read the
        # seven numbers from the right (rps first).
        calls_per_s = float(out.strip().splitlines()[-1].rsplit(",", 7)[1].strip('"'))
        seq = subprocess.run([*cli, "GET", keys[1]], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        if int(seq) != requests * batch:
            raise BenchError(f"the script issued {seq} seqs for {requests * batch} events")
        return calls_per_s * batch, 1e6 * cpu / (requests * batch)
    finally:
        redis.stop()


def retried(function, *args):
    """``function(*args)``, once more if it raises BenchError (a member that
    timed out while seating on a loaded machine); the second error stands."""
    try:
        return function(*args)
    except BenchError as exc:
        print(f"run failed, once more: {str(exc)[:300]}", file=sys.stderr, flush=True)
        return function(*args)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _nodes(per_run: list[list[float]], fmt: str = "{:.2f}") -> str:
    """Per-node medians across runs, joined with " + "."""
    return " + ".join(fmt.format(_median(list(node))) for node in zip(*per_run))


def summary_rows(results: dict[str, list[tuple[dict, dict]]]) -> list[list[object]]:
    """One row per setup: medians over the repeats of the closed and paced runs."""
    def med(setup: str, phase: int, key: str) -> float:
        return _median([float(r[phase][key]) for r in results[setup]])

    rows = []
    base_rate, base_p99 = med("embedded", 0, "deliveries_per_s"), med("embedded", 1, "p99_ms")
    base_us = med("embedded", 0, "cpu_us")
    for setup, runs in results.items():
        rate, p99 = med(setup, 0, "deliveries_per_s"), med(setup, 1, "p99_ms")
        closed_us = [r[0]["cpu_us_per_delivery"] for r in runs]
        rows.append([
            setup, f"{rate:,.0f}", f"{rate / base_rate:.0%}",
            _nodes(closed_us), f"{base_us / med(setup, 0, 'cpu_us'):.0%}",
            f"{med(setup, 1, 'p50_ms'):.1f}", f"{p99:.1f}", f"{p99 / base_p99:.2f}x",
            _nodes([r[1]["cpu_us_per_delivery"] for r in runs]),
            "-" if setup == "embedded" else f"{med(setup, 0, 'redis_us_per_event'):.1f} / "
            f"{med(setup, 1, 'redis_us_per_event'):.0f}",
            sum(int(r[0]["lost"]) + int(r[1]["lost"]) for r in runs)])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--text-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20_000,
                        help="deliveries/s of the paced (latency) runs")
    # Enough in flight that the closed loop measures the node's work, not the
    # round trips of the Redis path (at window 1 a scheduling delay of each
    # extra hop on a loaded machine throttles the loop).
    parser.add_argument("--window", type=int, default=24,
                        help="closed loop: messages each publisher keeps in flight")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each setup, interleaved; the table shows medians")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on seating, seconds")
    args = parser.parse_args()
    raise_fd_limit(args.members * 3)
    load_before = os.getloadavg()[0]
    results: dict[str, list[tuple[dict, dict]]] = {s: [] for s in SETUPS}
    ceilings: dict[int, list[tuple[float, float]]] = {1: [], 10: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        binary = build_loadgen(tmp)
        for _ in range(args.repeat):
            for setup in SETUPS:
                closed = retried(run, binary, tmp, setup, args)
                # One figure per setup for the ratio: the mean over its nodes.
                closed["cpu_us"] = statistics.fmean(closed["cpu_us_per_delivery"])
                results[setup].append((closed, retried(run, binary, tmp, setup, args,
                                                       args.rate)))
            for batch in ceilings:
                ceilings[batch].append(ceiling(tmp, batch, args.text_bytes))
    print(table(
        f"One room, {args.members} members, {args.publishers} publishers, {args.text_bytes}-byte "
        f"messages; medians of {args.repeat} runs.  Closed loop: window {args.window}.  "
        f"Latency: paced at {args.rate:,.0f} deliveries/s.  Load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        ["setup", "deliveries/s", "vs embedded", "node CPU us/delivery",
         "deliveries per node CPU-s, vs embedded", "p50 ms", "p99 ms", "p99 vs embedded",
         f"node CPU us/delivery at {args.rate / 1000:g}k/s",
         "Redis CPU us/event (closed / paced)", "lost"],
        summary_rows(results)))
    print(table("Publish ceiling of the room's Redis script (tcpserver.redisscripts.PUBLISH by "
                "redis-benchmark: 20 connections, 16 calls pipelined)",
                ["events per call", "events/s", "Redis CPU us/event", "events per Redis CPU-s"],
                [[batch, f"{_median([e for e, _ in runs]):,.0f}",
                  f"{_median([u for _, u in runs]):.1f}",
                  f"{1e6 / _median([u for _, u in runs]):,.0f}"]
                 for batch, runs in ceilings.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
