"""Suites that need the server's durable room log (``--db``).

* restart: N members seated on a server with ``--db FILE`` while publishers
  talk; the server is killed (SIGKILL by default, or --signal TERM) and
  started again on the same port and file.  Measured: seconds from the drop
  until every member has reconnected, rejoined and received its gap through
  ``history`` (the generator's own jittered backoff included), and lost
  events (seq gaps plus ``missed``), which must be 0.
* durable: seated throughput with ``--db FILE`` against ``--db :memory:`` in
  the same run (target >= 90%); database bytes per 1,000 events; start-up
  time and RSS of a server whose file holds --fill-events events (default
  1,000,000), filled through the server itself.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import time
from pathlib import Path

from harness import (
    BenchError,
    Loadgen,
    Process,
    evictions,
    server_supports,
    start_server,
    table,
)

from tcpserver import protocol

# Talkers during the restart run: enough that the kill lands mid-burst.
RESTART_PUBLISHERS = 10
# Traffic before the kill, so members hold different last seqs.
TRAFFIC_BEFORE_KILL_S = 1.0


def _db_args(db: str) -> list[str]:
    args = [f"--db={db}"]
    # Keep every event, so that bytes per event and the fill are exact.
    if server_supports("--retain-events"):
        args.append("--retain-events=100000000")
    return args


def room_last_seq(port: int) -> int:
    """The room's last seq, from the welcome a probe member gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(protocol.encode_frame({"type": "hello", "name": "benchprobe"}))
        decoder = protocol.FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise BenchError("the server closed before the probe's welcome")
            decoder.receive_data(data)
            while (payload := decoder.next_payload()) is not None:
                message = protocol.parse_server_message(payload)
                if message["type"] == "welcome":
                    return message["last_seq"]


def db_bytes(db: Path) -> int:
    """The database file with its write-ahead log."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def restart_run(binary: Path, tmp: Path, members: int, args: argparse.Namespace) -> list:
    """One restart: a table row."""
    db = tmp / f"restart-{members}-{time.monotonic_ns()}.db"
    server = start_server(tmp, members, *_db_args(str(db)), log_name=f"restart-{members}.log")
    restarted: Process | None = None
    try:
        gen = Loadgen(binary, "restart", "chat", server.port, members,
                      publishers=min(RESTART_PUBLISHERS, members), timeout=args.timeout)
        seated = gen.line("seated")
        if int(seated["joined"]) < members:
            gen.close()
            refusals = [line for line in server.log_text().splitlines()
                        if " WARNING " in line or " ERROR " in line][-5:]
            raise BenchError(f"restart: only {seated['joined']} of {members} seated; "
                             f"load generator: {gen.errors()[-600:]!r}; server: {refusals!r}")
        time.sleep(TRAFFIC_BEFORE_KILL_S)
        server.kill(getattr(signal, f"SIG{args.signal}"))
        restarted = start_server(tmp, members, *_db_args(str(db)), port=server.port,
                                 log_name=f"restart-{members}.log")
        result = gen.line("result")
        gen.close()
        return [members, args.signal, f"{result['back']}/{members}",
                result["back_p50_s"], result["back_s"], f"{restarted.ready_s:.2f}",
                f"{restarted.cpu():.1f}", result["connects"], result["lost"],
                f"{result['missed']}/{result['paged']}", result["epoch_changed"],
                evictions(restarted)]
    finally:
        server.stop()
        if restarted:
            restarted.stop()


def suite_restart(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    if not server_supports("--db"):
        return "\nrestart: skipped: this server has no --db"
    rows = []
    for members in args.members or [1000, 5000, 10000]:
        runs = [restart_run(binary, tmp, members, args) for _ in range(args.repeat)]
        rows += runs
        if args.repeat > 1:
            rows.append([members, f"median of {args.repeat}", "",
                         f"{statistics.median(float(r[3]) for r in runs):.3f}",
                         f"{statistics.median(float(r[4]) for r in runs):.3f}", *[""] * 7])
    return table("Restart: all members back (reconnected, rejoined, gap filled) after the "
                 "server died mid-burst",
                 ["members", "signal", "back", "half back s", "all back s", "server start s",
                  "server CPU s", "reconnects", "lost", "missed/paged back",
                  "epoch changed", "evictions"], rows)


def suite_durable(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    if not server_supports("--db"):
        return "\ndurable: skipped: this server has no --db"
    from run import median_row, seated_run  # run imports this module

    members = (args.members or [1000])[0]
    rows = []
    rates: dict[str, list[float]] = {"file": [], "memory": []}
    for i in range(args.repeat):
        # The file's default retention (1,000,000 events) is left as shipped.
        memory = seated_run(binary, tmp, "chat", members, args, ["--db=:memory:"])
        sqlite = seated_run(binary, tmp, "chat", members, args,
                            [f"--db={tmp / f'durable-{i}.db'}"])
        rates["memory"].append(float(memory["deliveries_per_s"]))
        rates["file"].append(float(sqlite["deliveries_per_s"]))
        ratio = rates["file"][-1] / rates["memory"][-1]
        for name, r in ((":memory:", memory), ("SQLite file", sqlite)):
            rows.append([members, name, f"{float(r['deliveries_per_s']) / 1e6:.2f} M",
                         f"{ratio:.0%}" if r is sqlite else "", f"{r['cpu_share']:.0%}",
                         f"{r['ns_per_delivery']:.0f}",
                         r["published"], r["lost"], r["evictions"]])
    if args.repeat > 1:
        rows.append(median_row(members, rates["file"], rates["memory"], "%")[:9])
    out = table(f"Durable log: seated throughput, {args.publishers} publishers, "
                f"{args.seconds:g} s each",
                ["members", "--db", "deliveries/s", "vs :memory:", "server CPU",
                 "CPU ns/delivery", "published", "lost", "evictions"], rows)
    return out + "\n" + fill_and_restart(binary, tmp, args)


def fill_and_restart(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    """Fill a database through the server, then time a start on it."""
    db = tmp / "filled.db"
    db.unlink(missing_ok=True)
    empty = start_server(tmp, 100, *_db_args(str(db)), log_name="fill.log")
    empty_row = ["0", f"{empty.ready_s:.2f}", f"{empty.rss_kib() / 1024:.1f}", "-", "-"]
    try:
        # Few members, deep windows: the bound is the server's store rate.
        gen = Loadgen(binary, "throughput", "chat", empty.port, 5, publishers=5, window=64,
                      count=args.fill_events, seconds=args.timeout * 5, timeout=args.timeout)
        gen.line("seated")
        fill = gen.line("result")
        gen.close()
        stored = room_last_seq(empty.port)
    finally:
        empty.stop()
    size = db_bytes(db)
    filled = start_server(tmp, 100, *_db_args(str(db)), log_name="filled.log")
    try:
        ready_s, rss = filled.ready_s, filled.rss_kib()
        reopened = room_last_seq(filled.port)
    finally:
        filled.stop()
    if reopened < stored:
        raise BenchError(f"the restarted server's last seq is {reopened}, not {stored}")
    rows = [empty_row, [f"{stored:,}", f"{ready_s:.2f}", f"{rss / 1024:.1f}",
                        f"{size / 1e6:.1f}", f"{size / stored:.0f}"]]
    return table(f"Durable log: start-up (Popen to 'listening on') and RSS by stored events; "
                 f"filled through the server at "
                 f"{int(fill['published']) / float(fill['seconds']):,.0f} events/s",
                 ["stored events", "start s", "RSS MiB", "db MB", "KB per 1,000 events"], rows)
