"""What every benchmark suite needs: the C load generator, the chat server
and Debian's redis-server as subprocesses on loopback, /proc readings, and
a plain-text table.

Only processes started here are stopped, by their own PID.  Every wait is
bounded; a process that does not start in time raises ``BenchError``.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Where ``python -m tcpserver`` runs: this checkout, or another one (an
# older commit's ``git archive``) for before-and-after figures.
SERVER_ROOT = ROOT
# A load generator run past this is stuck, not slow.
LOADGEN_TIMEOUT = 600.0


class BenchError(RuntimeError):
    """A process did not start, or a load run failed."""


def raise_fd_limit(connections: int) -> None:
    """Let this process and its children hold ``connections`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, connections + 512)), hard))


def build_loadgen(out_dir: Path) -> Path:
    """Compile loadgen.c with the system C compiler; return the binary's path."""
    binary = out_dir / "loadgen"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(HERE / "loadgen.c")],
                   check=True)
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure (VmRSS, VmHWM, ...) of a live process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Process:
    """A subprocess with its output in a log file; ``stop`` ends it by PID."""

    def __init__(self, argv: list[str], log_path: Path, ready: str, timeout: float = 30.0,
                 cwd: Path = ROOT):
        self.log_path = log_path
        self.started = time.monotonic()
        self._log = open(log_path, "a")
        self._offset = log_path.stat().st_size
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self.pid = self.proc.pid
        self.match = self._wait_for(ready, timeout)
        self.ready_s = time.monotonic() - self.started

    def _wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text()[self._offset:]
            if m := re.search(pattern, text):
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.log_path.name}: no {pattern!r}:\n{text[-2000:]}")
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log_path.read_text()[self._offset:]

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@functools.cache
def _server_help(root: Path) -> str:
    return subprocess.run([sys.executable, "-m", "tcpserver", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=30).stdout


def server_supports(option: str) -> bool:
    """Whether the chat server at SERVER_ROOT has a command-line option."""
    return option in _server_help(SERVER_ROOT)


def start_server(tmp: Path, members: int, *extra: str, port: int = 0,
                 log_name: str = "server.log") -> Process:
    """The chat server on loopback with room for ``members`` and no rate limit.

    Without a ``--db`` in ``extra`` it gets a new SQLite file in ``tmp``
    (never the user's own room), as a server does by default.  The load
    generator's members stand for many direct TCP clients, not a gateway's
    browsers, so loopback is not a trusted proxy here (192.0.2.1 is a
    documentation address, RFC 5737, that never connects): they are counted
    by --max-per-ip, not by the proxies' --max-pending-proxied.
    """
    if server_supports("--db") and not any(arg.startswith("--db") for arg in extra):
        extra = (f"--db={tmp / f'room-{time.monotonic_ns()}.db'}", *extra)
    argv = [sys.executable, "-m", "tcpserver", "--name=server", f"--port={port}",
            f"--max-per-ip={members + 100}", f"--max-clients={members + 100}",
            "--trusted-proxy=192.0.2.1", "--msg-rate=1e9", "--msg-burst=1000000000", *extra]
    if server_supports("--max-pending-proxied"):
        # Should a caller trust loopback again, its storm must not meet the
        # proxies' own bound before hello either.
        argv.append(f"--max-pending-proxied={members + 100}")
    server = Process(argv, tmp / log_name, r"listening on \S+:(\d+)", cwd=SERVER_ROOT)
    server.port = int(server.match.group(1))
    return server


def start_redis(tmp: Path, members: int) -> Process:
    """Debian's redis-server on a free loopback port, with no persistence.

    Its accept backlog matches the chat server's, so a connect storm meets
    the same kernel queue.  Raises BenchError if redis-server is missing.
    """
    if not shutil.which("redis-server"):
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp),
            "--tcp-backlog", "4096", "--maxclients", str(members + 1000)]
    redis = Process(argv, tmp / f"redis-{port}.log", r"Ready to accept connections")
    redis.port = port
    return redis


def evictions(server: Process) -> int:
    """Slow readers the server evicted since it started (from its log)."""
    return server.log_text().count("evicted as a slow reader")


class Loadgen:
    """One run of the C load generator; reads its ``key=value`` lines."""

    def __init__(self, binary: Path, mode: str, proto: str, port: int, members: int,
                 **options: object):
        argv = [str(binary), mode, proto, str(port), str(members)]
        argv += [f"{k}={v}" for k, v in options.items()]
        # A file, not a pipe: thousands of members' errors would fill a pipe
        # and stall the generator.
        self.err_path = binary.parent / "loadgen.err"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        self.deadline = time.monotonic() + LOADGEN_TIMEOUT

    def line(self, prefix: str) -> dict[str, str]:
        """Wait (bounded) for the next stdout line starting with ``prefix``."""
        while time.monotonic() < self.deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                continue
            text = self.proc.stdout.readline()
            if not text:
                break
            if text.startswith(prefix):
                return dict(kv.split("=", 1) for kv in text.split()[1:])
        self.close()
        raise BenchError(f"loadgen gave no {prefix!r} line: {self.errors()}")

    def errors(self) -> str:
        """The end of what the generator wrote to stderr."""
        return self.err_path.read_text()[-2000:]

    def go(self) -> None:
        """Release a run started with sync=1, or end a hold."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """End the run (closing stdin ends a hold) and wait for the exit."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table, so the output pastes into README as it is."""
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
