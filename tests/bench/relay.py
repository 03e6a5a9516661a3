"""Gateway relay benchmark: WebSocket sessions through the web gateway, and
through websockify in front of the same chat server, in one run.

    python tests/bench/relay.py [--sessions 100] [--publishers 10]
                                  [--window 32] [--text-bytes 100]
                                  [--seconds 5] [--workers 1]
                                  [--no-websockify] [--baseline CHECKOUT]
                                  [--compress 15]
                                  [--profile PATH]

Starts the chat server (rate limits lifted) and ``python -m gateway`` on
free loopback ports, and ``websockify`` (``pip install websockify``; skipped
with a note if it is missing) in front of the same server.  For each of
them, one bounded load from this process (aiohttp client): SESSIONS
sessions join; the first PUBLISHERS each keep WINDOW messages in flight (a
new ``say`` when one of its own comes back), so the offered load follows
what is delivered and nobody falls behind; every message goes to every
session.  The gateway is spoken to in JSON text (several payloads per
message, one per line; with ``--compress 15`` the sessions offer
permessage-deflate, as Chromium and Firefox do, and the gateway is run
with ``--ws-deflate`` to accept it);
websockify carries raw frames in binary messages.

Prints, per target, one line of key=value pairs: deliveries per second in
the measured window, lost messages (must be 0), the target's CPU use and
deliveries per CPU second of it (the fair figure on a shared machine, where
a process gets a share of the cores rather than what it asks for), and
its memory per session (PSS of its processes, all joined minus none, over
SESSIONS), and the CPU use of the chat server and of this load generator
(if either is near 100% of a core, it is the bottleneck, not the target).
Then the gateway's ratio to websockify, and to ``--baseline``: the gateway
of another checkout (``git worktree add --detach /tmp/old COMMIT``) run
against the same server, for before/after figures in one run.  Not part of the test suite:
timings belong in a benchmark, not in assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tcpserver import protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
START_TIMEOUT = 15.0
# After the window closes, messages still in flight must arrive within this.
DRAIN_TIMEOUT = 20.0
JOIN_TIMEOUT = 60.0
MESSAGE_TAG = b'"type":"message"'


# --- processes ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(log_path: Path, pattern: str, proc: subprocess.Popen) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"{pattern!r} not seen:\n{log_path.read_text(errors='replace')}")


def wait_listening(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}:\n{log_path.read_text(errors='replace')}")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (websockify forks one per session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants, in KiB: pages
    shared after a fork are counted once, not once per process."""
    total = 0
    for member in tree(pid):
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue
        total += int(re.search(r"^Pss:\s+(\d+)", text, re.MULTILINE).group(1))
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` and its live descendants."""
    total = 0.0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / 100.0
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- load ------------------------------------------------------------------

class Member:
    """One session: counts room messages; a publisher keeps WINDOW in flight."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, name: str, binary: bool,
                 say: str | bytes | None, window: int) -> None:
        self.ws, self.name, self.binary = ws, name, binary
        self.say, self.window = say, window
        self.own_tag = f'"from":"{name}@'.encode()
        self.received = 0
        self.sent = 0
        self.echoed = 0
        self.publishing = False
        self._tail = b""

    def _count(self, data: bytes) -> tuple[int, int]:
        # A raw byte stream (websockify) may split a tag across messages.
        if not self.binary:
            return data.count(MESSAGE_TAG), data.count(self.own_tag)
        old = self._tail
        buf = old + data
        self._tail = buf[-40:]
        # Tags wholly inside the old tail were counted last time.
        return (buf.count(MESSAGE_TAG) - old.count(MESSAGE_TAG),
                buf.count(self.own_tag) - old.count(self.own_tag))

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                data = msg.data.encode()
            elif msg.type is aiohttp.WSMsgType.BINARY:
                data = msg.data
            else:
                break
            messages, own = self._count(data)
            self.received += messages
            if self.say is not None:
                self.echoed += own
                await self.top_up()

    async def top_up(self) -> None:
        while self.publishing and self.sent - self.echoed < self.window:
            self.sent += 1
            if self.binary:
                await self.ws.send_bytes(self.say)
            else:
                await self.ws.send_str(self.say)


async def join(http: aiohttp.ClientSession, url: str, name: str, binary: bool,
               say, window: int, compress: int = 0) -> Member:
    if binary:
        ws = await http.ws_connect(url, protocols=("binary",), max_msg_size=0)
        await ws.send_bytes(protocol.encode_frame({"type": "hello", "name": name}))
        decoder = protocol.FrameDecoder()
        while True:
            msg = await ws.receive()
            decoder.receive_data(msg.data)
            if (payload := decoder.next_payload()) is not None:
                break
    else:
        ws = await http.ws_connect(url, max_msg_size=0, compress=compress)
        await ws.send_str(f'{{"type":"hello","name":"{name}"}}')
        payload = (await ws.receive()).data.split("\n", 1)[0].encode()
    message = protocol.parse_server_message(payload)
    if message["type"] != "welcome":
        raise SystemExit(f"{name} was not welcomed: {message}")
    return Member(ws, name, binary, say, window)


async def load(url: str, binary: bool, args, prefix: str, pid: int, server_pid: int) -> dict:
    say_message = {"type": "say", "text": "x" * args.text_bytes}
    say = protocol.encode_frame(say_message) if binary else \
        protocol.encode_payload(say_message).decode()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        pss_before = pss_kib(pid)
        gate = asyncio.Semaphore(50)

        async def one(i: int) -> Member:
            async with gate:
                return await join(http, url, f"{prefix}{i:04d}", binary,
                                  say if i < args.publishers else None, args.window,
                                  0 if binary else args.compress)

        started = time.monotonic()
        join_cpu = cpu_seconds(pid), cpu_seconds(server_pid)
        members = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(args.sessions))), JOIN_TIMEOUT)
        joined_s = time.monotonic() - started
        join_cpu = cpu_seconds(pid) - join_cpu[0], cpu_seconds(server_pid) - join_cpu[1]
        readers = [asyncio.create_task(m.run()) for m in members]
        await asyncio.sleep(1.0)  # let the join bursts settle
        pss_joined = pss_kib(pid)
        publishers = members[:args.publishers]

        cpu_before = cpu_seconds(pid)
        server_before = cpu_seconds(server_pid)
        own_before = own_cpu_seconds()
        base = sum(m.received for m in members)
        t0 = time.monotonic()
        for p in publishers:
            p.publishing = True
            await p.top_up()
        await asyncio.sleep(args.seconds)
        delivered = sum(m.received for m in members) - base
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu_before
        server_cpu = cpu_seconds(server_pid) - server_before
        own = own_cpu_seconds() - own_before
        for p in publishers:
            p.publishing = False

        published = sum(p.sent for p in publishers)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and any(
                m.received < published for m in members):
            await asyncio.sleep(0.05)
        lost = sum(max(0, published - m.received) for m in members)
        for m in members:
            await m.ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
    return {
        "deliveries_per_s": round(delivered / elapsed),
        "published": published,
        "lost": lost,
        "join_s": round(joined_s, 2),
        "join_cpu_s": round(join_cpu[0], 2),  # the relay's, while they joined
        "join_server_cpu_s": round(join_cpu[1], 2),
        "cpu_pct": round(100 * cpu / elapsed),
        # On a shared machine a process gets a share of the cores, not what
        # it asks for; deliveries per CPU second of the target compare the
        # work each does per delivery, whatever share it got.
        "deliveries_per_cpu_s": round(delivered / max(cpu, 0.01)),
        "loadgen_cpu_pct": round(100 * own / elapsed),
        "server_cpu_pct": round(100 * server_cpu / elapsed),
        "pss_per_session_KiB": round((pss_joined - pss_before) / args.sessions, 1),
        "pss_MiB": round(pss_joined / 1024, 1),
    }


# --- main --------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--window", type=int, default=32,
                        help="messages each publisher keeps in flight")
    parser.add_argument("--text-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--no-websockify", action="store_true")
    parser.add_argument("--compress", type=int, default=0, choices=(0, 9, 15),
                        help="offer the gateway permessage-deflate with this window "
                        "(bits), as browsers do (15); 0: none")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also measure the gateway of another checkout (e.g. a git "
                        "worktree of an older commit) against the same server")
    parser.add_argument("--baseline-option", action="append", default=[], metavar="OPT",
                        help="an option for the baseline gateway, e.g. --loop=asyncio; "
                        "repeatable (without --baseline: this checkout's gateway)")
    parser.add_argument("--profile", metavar="PATH",
                        help="run the gateway (one worker) under cProfile, stats to PATH")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * args.sessions + 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, want)), hard))

    websockify = None if args.no_websockify else (
        shutil.which("websockify", path=str(Path(sys.executable).parent))
        or shutil.which("websockify"))
    procs: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def start(name: str, argv: list[str], cwd: Path = ROOT
                  ) -> tuple[subprocess.Popen, Path]:
            log_path = Path(tmp) / f"{name}.log"
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd=cwd))
            return procs[-1], log_path

        def gateway_run(name: str, root: Path, python: list[str], options: list[str]) -> None:
            # ``python -m gateway`` imports the package from its working
            # directory, so ROOT or a baseline checkout decides the code.
            gateway, log = start(name, [
                sys.executable, *python, "-m", "gateway", "--http-port=0",
                f"--chat-port={chat_port}", f"--max-sessions-per-ip={args.sessions + 10}",
                "--log-level=info", *options], cwd=root)
            http_port = int(wait_for(log, r"serving on http://\S+?:(\d+)/", gateway).group(1))
            results[name] = asyncio.run(load(
                f"http://127.0.0.1:{http_port}/ws", False, args, name[0], gateway.pid,
                server.pid))
            gateway.terminate()
            gateway.wait(30)

        try:
            server, log = start("server", [
                sys.executable, "-m", "tcpserver", "--name=server", "--port=0",
                f"--max-per-ip={2 * args.sessions + 20}",
                f"--max-clients={2 * args.sessions + 20}", "--msg-rate=1e9",
                "--msg-burst=1000000000", "--idle-timeout=600", "--log-level=info",
                # Never the user's room database (the default --db), which a
                # second run would find locked.
                "--db=:memory:"])
            chat_port = int(wait_for(log, r"listening on \S+:(\d+)", server).group(1))

            profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
            options = [f"--workers={args.workers}"] if args.workers > 1 else []
            if args.compress:
                options.append("--ws-deflate")  # off by default since 29 Nov
            gateway_run("gateway", ROOT, profile, options)
            if args.baseline or args.baseline_option:
                gateway_run("baseline", Path(args.baseline or ROOT).resolve(), [],
                            args.baseline_option)

            if websockify:
                ws_port = free_port()
                proxy, log = start("websockify", [
                    websockify, f"127.0.0.1:{ws_port}", f"127.0.0.1:{chat_port}"])
                wait_listening(ws_port, proxy, log)
                results["websockify"] = asyncio.run(load(
                    f"http://127.0.0.1:{ws_port}/", True, args, "w", proxy.pid, server.pid))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"sessions={args.sessions} publishers={args.publishers} window={args.window} "
          f"text_bytes={args.text_bytes} seconds={args.seconds} workers={args.workers} "
          f"compress={args.compress}")
    for name, result in results.items():
        print(name + ": " + " ".join(f"{k}={v}" for k, v in result.items()))
    for other in ("baseline", "websockify"):
        if other in results:
            ratio = (results["gateway"]["deliveries_per_s"]
                     / max(1, results[other]["deliveries_per_s"]))
            print(f"gateway/{other}={ratio:.2f}x")
    if "websockify" not in results and not args.no_websockify:
        print("websockify not found: pip install websockify")
    return 0 if all(r["lost"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
