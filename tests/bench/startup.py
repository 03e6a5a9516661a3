"""Start-up with a big room log: database size per 1,000 events, and the
server's start-up time and memory with N stored events.

    .venv/bin/python tests/bench/startup.py --events 1000000

Fills a fresh SQLite file through ``SqliteLog`` (the server's own code)
with N 100-byte messages, 1000 per transaction, then starts the real server
on it several times and times each from spawn to its ``listening on`` line
(the log is opened before that line), reading its RSS once it listens.  The
same is measured on an empty database, so the two compare directly.
Bounded: at most 5,000,000 events, every wait has a timeout, and only the
servers started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from tcpserver import protocol  # noqa: E402
from tcpserver.sqlitelog import SqliteLog  # noqa: E402

MAX_EVENTS = 5_000_000
START_TIMEOUT = 30.0
LISTENING = re.compile(rb"listening on \S+:\d+")


def fill(path: Path, events: int, text_bytes: int) -> float:
    """Write ``events`` messages; return the seconds it took."""
    started = time.monotonic()
    roomlog = SqliteLog(path, protocol.MAX_FRAME_SIZE, 100, MAX_EVENTS)
    text = "x" * text_bytes
    batch = 1000
    for done in range(0, events, batch):
        for i in range(min(batch, events - done)):
            roomlog.stage({"type": "message", "from": f"user{i % 100}@127.0.0.1",
                           "text": text, "ts": int(time.time() * 1000)})
        roomlog.commit()
    roomlog.close()
    return time.monotonic() - started


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")
               if not p.name.endswith(".lock"))


def start_once(db: Path) -> tuple[float, int]:
    """Start the server on ``db``; return (seconds to listening, RSS KiB)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tcpserver", "--name=server", "--port=0",
                             f"--db={db}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        output = b""
        while not LISTENING.search(output):
            line = proc.stderr.readline()
            if not line or time.monotonic() - started > START_TIMEOUT:
                raise RuntimeError(f"server did not start: {output.decode(errors='replace')}")
            output += line
        elapsed = time.monotonic() - started
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        return elapsed, rss
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stderr.close()


def measure(db: Path, runs: int) -> str:
    results = [start_once(db) for _ in range(runs)]
    times = [t for t, _ in results]
    rss = [r for _, r in results]
    return (f"start-up {statistics.median(times):.3f} s median (min {min(times):.3f}, "
            f"max {max(times):.3f}), RSS {statistics.median(rss) / 1024:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--text-bytes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="start-ups measured per file")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to put the files (default: a temporary directory)")
    args = parser.parse_args()
    if not 0 < args.events <= MAX_EVENTS:
        parser.error(f"--events must be 1..{MAX_EVENTS}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big, empty = Path(tmp) / "big.db", Path(tmp) / "empty.db"
        seconds = fill(big, args.events, args.text_bytes)
        size = db_bytes(big)
        print(f"filled {args.events} events of {args.text_bytes}-byte text in {seconds:.1f} s "
              f"({args.events / seconds:,.0f} events/s in 1000-event transactions)")
        print(f"database: {size:,} bytes, {size / args.events * 1000:,.0f} bytes per "
              "1,000 events")
        fill(empty, 1, args.text_bytes)
        print(f"{args.events} events: {measure(big, args.runs)}")
        print(f"1 event:       {measure(empty, args.runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
