"""A real redis-server for tests: a free loopback port, a temp directory,
killed by PID.  ``RedisServer.restart()`` keeps the port (and, unless told,
the data directory), as an operator's restart would."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Debian's redis-server.  ``persist``: appendonly with an fsync per
    write (nothing acknowledged is lost by a kill -9); else no persistence."""

    def __init__(self, directory: Path, persist: bool = False) -> None:
        self.dir = directory
        self.persist = persist
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--daemonize", "no", "--dir", str(self.dir), "--save", "",
                "--logfile", str(self.dir / "redis.log")]
        if self.persist:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()}")

    def kill(self) -> None:
        """kill -9, by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, wipe: bool = False) -> None:
        """Kill -9 and start again on the same port; ``wipe`` deletes the data."""
        self.kill()
        if wipe:
            shutil.rmtree(self.dir)
        self.start()


@pytest.fixture
def start_redis(tmp_path):
    """Factory ``start_redis(persist=False) -> RedisServer``; all killed at
    teardown.  Skips the test where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs Debian's redis-server (apt-get install redis-server)")
    started: list[RedisServer] = []

    def start(persist: bool = False) -> RedisServer:
        redis = RedisServer(tmp_path / f"redis-{len(started)}", persist)
        started.append(redis)
        return redis

    yield start
    for redis in started:
        redis.kill()
