"""Broadcast benchmark: the real server against the C load generator.

    python tests/bench/run.py [--members 1000] [--publishers 100]
                              [--text-bytes 100] [--seconds 10] [--window 1]
                              [--backend auto]

Compiles loadgen.c with the system C compiler, starts the server on a free
loopback port with the rate limits lifted, runs one bounded load, and prints
deliveries per second with the server's peak memory and CPU time.  Not part
of the test suite: timings belong in a benchmark, not in assertions.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def build_loadgen(out_dir: Path) -> Path:
    binary = out_dir / "loadgen"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(HERE / "loadgen.c")],
                   check=True)
    return binary


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / 100.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--text-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=1,
                        help="messages each publisher keeps in flight")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.members + 256)), hard))

    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w+") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "tcpserver", "--name=server", "--port=0",
                 f"--backend={args.backend}", f"--max-per-ip={args.members + 10}",
                 f"--max-clients={args.members + 10}", "--msg-rate=1e9",
                 "--msg-burst=1000000000", "--log-level=info"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 10
                while not (m := re.search(r"listening on \S+:(\d+)", log_path.read_text())):
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"server did not start:\n{log_path.read_text()}")
                    time.sleep(0.05)
                port = m.group(1)
                cpu_before = cpu_seconds(server.pid)
                result = subprocess.run(
                    [str(loadgen), port, str(args.members), str(args.publishers),
                     str(args.text_bytes), str(args.seconds), str(args.window)],
                    capture_output=True, text=True, timeout=args.seconds + 120)
                cpu = cpu_seconds(server.pid) - cpu_before
                rss = peak_rss_kib(server.pid)
            finally:
                server.terminate()
                server.wait(30)
        if result.returncode != 0:
            print(result.stdout, result.stderr, log_path.read_text(), sep="\n")
            return 1
        evictions = log_path.read_text().count("slow reader")
    print(result.stdout.strip())
    print(f"server: peak_rss_MiB={rss / 1024:.1f} cpu_s={cpu:.1f} "
          f"slow_reader_evictions={evictions} backend={args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
