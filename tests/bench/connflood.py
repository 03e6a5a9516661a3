"""Connection flood: members' echo latency while one address opens
connections as fast as it can, each closed shortly after.

    python tests/bench/connflood.py [--connections 12000] [--members 5]
                                    [--trusted-loopback]

The flooder is a child process (so its work does not share this process's
GIL with the members); each member says a line every 10 ms whatever
happens (open loop), and the latency of every line until it comes back is
recorded, from the flood's start until 2 s after its end.  By default
loopback is not a trusted proxy here, so the flood meets the per-address
limit (--max-per-ip 32) as a remote host would; with --trusted-loopback it
meets --max-pending-proxied instead.  The members'
rate limit is lifted so that the figure is the loop's latency, not fake lag.

Target: echo latency p99 under 50 ms during the flood.  Not a unit test:
tests/test_server_abuse.py checks the behaviour, never timings.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from harness import Process, cpu_seconds, raise_fd_limit, table  # noqa: E402

from tcpserver import protocol  # noqa: E402

# Connections the flooder keeps open at once: each is closed this many
# connects later ("shortly after").
FLOOD_WINDOW = 20
# A flood that has not finished by then is reported as it stands.
FLOOD_LIMIT_S = 120.0
BASELINE_S = 2.0
# Latency is still sampled this long after the flooder finished: the server
# may still be taking the connections queued in the kernel.
AFTER_FLOOD_S = 2.0
# Each member says a line this often (100 a second).
SEND_INTERVAL = 0.01


class Member:
    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = protocol.FrameDecoder()
        self.name = name
        self.count = 0
        self.send({"type": "hello", "name": name})
        self.label = self.until(lambda m: m["type"] == "welcome")["label"]

    def send(self, message: dict) -> None:
        self.sock.sendall(protocol.encode_frame(message))

    def until(self, predicate) -> dict:
        while True:
            payload = self.decoder.next_payload()
            if payload is not None:
                msg = json.loads(payload)
                if msg["type"] == "ping":
                    self.send({"type": "pong", "token": msg.get("token")})
                if predicate(msg):
                    return msg
                continue
            data = self.sock.recv(262144)
            if not data:
                raise EOFError(f"{self.name}: the server closed the connection")
            self.decoder.receive_data(data)

    def feed(self, sent: dict[str, float], latencies: list[float]) -> None:
        """Read what is ready; record the latency of our own lines."""
        data = self.sock.recv(262144)
        if not data:
            raise EOFError(f"{self.name}: the server closed the connection")
        self.decoder.receive_data(data)
        now = time.perf_counter()
        while (payload := self.decoder.next_payload()) is not None:
            msg = json.loads(payload)
            if msg["type"] == "ping":
                self.send({"type": "pong", "token": msg.get("token")})
            elif msg["type"] == "message" and msg["from"] == self.label:
                latencies.append(now - sent.pop(msg["text"]))


def sample(members: list[Member], seconds: float, done=None) -> list[float]:
    """Each member says a line every SEND_INTERVAL (open loop: a stall delays
    every line due meanwhile, as it would real users); return the latencies
    of the lines sent until ``seconds`` passed, or ``done()`` is true and
    AFTER_FLOOD_S more passed."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    socks = {m.sock: m for m in members}
    start = time.perf_counter()
    next_send = start
    stop_at = start + seconds
    count = 0
    while time.perf_counter() < stop_at or sent:
        now = time.perf_counter()
        if done is not None and stop_at - now > AFTER_FLOOD_S and done():
            stop_at = now + AFTER_FLOOD_S
        if now >= next_send and now < stop_at:
            count += 1
            for member in members:
                text = f"{member.name} {count}"
                sent[text] = time.perf_counter()
                member.send({"type": "say", "text": text})
            next_send += SEND_INTERVAL
        ready, _, _ = select.select(list(socks), [], [], max(0.0, next_send - now))
        for sock in ready:
            socks[sock].feed(sent, latencies)
        if time.perf_counter() > stop_at + 10:
            raise RuntimeError(f"{len(sent)} lines never came back")
    return latencies


def flood(port: int, connections: int) -> None:
    """The child: connect ``connections`` times, closing each FLOOD_WINDOW
    connects later; print a JSON summary."""
    opened, failed = [], 0
    start = time.monotonic()
    for _ in range(connections):
        if time.monotonic() - start > FLOOD_LIMIT_S:
            break
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            opened.append(sock)
        except OSError:
            failed += 1
        if len(opened) > FLOOD_WINDOW:
            opened.pop(0).close()
    for sock in opened:
        sock.close()
    print(json.dumps({"connections": connections, "failed": failed,
                      "seconds": time.monotonic() - start}), flush=True)


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(args: argparse.Namespace) -> str:
    raise_fd_limit(args.connections + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="connflood-"))
    extra = [] if args.trusted_loopback else ["--trusted-proxy=192.0.2.1/32"]
    server = Process([sys.executable, "-m", "tcpserver", "--name=server", "--port=0",
                      "--db=:memory:", "--msg-rate=1e6", "--msg-burst=1000000", *extra],
                     tmp / "server.log", r"listening on \S+:(\d+)")
    port = int(server.match.group(1))
    rows = []
    try:
        members = [Member(port, f"m{i}") for i in range(args.members)]
        for member in members:  # everyone has seen everyone's join
            member.until(lambda m: m.get("member") == members[-1].label)
        baseline = sample(members, BASELINE_S)
        cpu0 = cpu_seconds(server.pid)
        child = subprocess.Popen([sys.executable, __file__, "--flood-child", str(port),
                                  "--connections", str(args.connections)],
                                 stdout=subprocess.PIPE, text=True)
        during = sample(members, FLOOD_LIMIT_S + AFTER_FLOOD_S,
                        done=lambda: child.poll() is not None)
        summary = json.loads(child.stdout.read())
        cpu = cpu_seconds(server.pid) - cpu0
        # The server still takes a new member once it has seen the flood's
        # connections close.
        deadline = time.monotonic() + 10
        while True:
            try:
                Member(port, "late").sock.close()
                break
            except EOFError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        refusals = server.log_text().count("refused")
        for name, samples in (("before", baseline), ("during flood", during)):
            rows.append([name, str(len(samples)), f"{percentile(samples, 0.5) * 1e3:.2f}",
                         f"{percentile(samples, 0.99) * 1e3:.2f}",
                         f"{max(samples) * 1e3:.2f}"])
        note = (f"{summary['connections']} connections in {summary['seconds']:.1f} s "
                f"({summary['failed']} failed to connect), server CPU {cpu:.1f} s, "
                f"{refusals} refusal log lines (rate-limited)")
    finally:
        server.stop()
    return table(f"Connection flood, {args.members} members chatting: echo latency, ms",
                 ["phase", "echoes", "p50", "p99", "max"], rows) + "\n" + note + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=12000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--trusted-loopback", action="store_true",
                        help="keep loopback a trusted proxy (the server's default)")
    parser.add_argument("--flood-child", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_child:
        flood(args.flood_child, args.connections)
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
