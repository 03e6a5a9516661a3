"""Idle cost: the server's CPU time and memory with no clients, then with
many joined members who say nothing.

    python tests/bench/idle.py [--members 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import cpu_seconds

from tcpserver import protocol

ROOT = Path(__file__).resolve().parent.parent.parent


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.members + 256)), hard))
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tcpserver", "--name=server", "--port=0",
             f"--max-per-ip={args.members + 10}"], stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT)
        members = []
        try:
            deadline = time.monotonic() + 10
            while True:
                log.seek(0)
                if m := re.search(r"listening on \S+:(\d+)", log.read()):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.05)
            port = int(m.group(1))
            before = cpu_seconds(server.pid)
            time.sleep(args.seconds)
            print(f"no clients: cpu_s={cpu_seconds(server.pid) - before:.2f} "
                  f"over {args.seconds:g} s, rss_MiB={rss_mib(server.pid):.1f}")
            for i in range(args.members):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(protocol.encode_frame({"type": "hello", "name": f"idle{i}"}))
                members.append(sock)
            time.sleep(2)  # let the joins settle
            before = cpu_seconds(server.pid)
            time.sleep(args.seconds)
            print(f"{args.members} idle members: cpu_s={cpu_seconds(server.pid) - before:.2f} "
                  f"over {args.seconds:g} s, rss_MiB={rss_mib(server.pid):.1f}")
        finally:
            for sock in members:
                sock.close()
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
