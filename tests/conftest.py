"""Shared fixtures: the real chat server as a subprocess, and a raw client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tcpserver import protocol

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
LISTENING = re.compile(r"listening on (\S+):(\d+)")


class Program:
    """``python ARGS`` in a subprocess, its merged output going to a file
    that tests can search."""

    def __init__(self, log_dir: Path, *args: str, **popen) -> None:
        self.log_path = log_dir / f"program-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w+b")
        popen.setdefault("stdin", subprocess.DEVNULL)
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, **popen)

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_log(self, pattern: str | re.Pattern, timeout: float = 10.0) -> re.Match[str]:
        """First match of ``pattern`` in the output; AssertionError if it does
        not appear in time or the program exits without printing it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if self.proc.poll() is not None:
                match = re.search(pattern, self.log_text())  # output after the last look
                if match:
                    return match
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in output:\n{self.log_text()}")

    def signal(self, sig: int, timeout: float = 20.0) -> int:
        """Send ``sig``, wait, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        return self.signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._log.close()


class ServerProcess(Program):
    """``python -m tcpserver --name=server --port=0`` in a subprocess; ``port``
    is read from the server's own ``listening on HOST:PORT`` log line."""

    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        if not any(arg == "--db" or arg.startswith("--db=") for arg in args):
            # A real SQLite file per server, never the user's state directory.
            self.db = log_dir / f"room-{time.monotonic_ns()}.db"
            args = (f"--db={self.db}", *args)
        else:
            self.db = None
        super().__init__(log_dir, "-m", "tcpserver", "--name=server", "--port=0",
                         "--log-level=debug", *args,
                         env=None if env is None else {**os.environ, **env})
        try:
            match = self.wait_log(LISTENING)
        except AssertionError as exc:
            self.kill()
            raise RuntimeError(f"server did not start: {exc}") from None
        self.host, self.port = match.group(1), int(match.group(2))


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(*extra_cli_args, env=None) -> ServerProcess``
    (``env``: variables added to the environment).

    Every server started is killed at teardown if the test left it running.
    """
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """A server with default limits but room for many test clients per IP."""
    return start_server("--max-per-ip=200")


class RawClient:
    """A blocking test client on a real socket, speaking through the codec."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = protocol.FrameDecoder()
        self.label: str | None = None

    def send(self, message: dict) -> None:
        self.sock.sendall(protocol.encode_frame(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> dict:
        """Next message from the server; raises EOFError if it closed."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self.decoder.next_payload()
            if payload is not None:
                return protocol.parse_server_message(payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the server")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.receive_data(data)

    def recv_until(self, predicate, timeout: float = 5.0) -> tuple[dict, list[dict]]:
        """Read until ``predicate(msg)``; return it and everything before it."""
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg, seen
            seen.append(msg)

    def recv_type(self, kind: str, timeout: float = 5.0) -> dict:
        return self.recv_until(lambda m: m["type"] == kind, timeout)[0]

    def join(self, name: str) -> dict:
        """hello, then read up to and including our own join; return welcome."""
        self.send({"type": "hello", "name": name})
        welcome = self.recv_type("welcome")
        self.label = welcome["label"]
        self.recv_until(lambda m: m["type"] == "join" and m["member"] == self.label)
        return welcome

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Drain until EOF or reset; True if the server closed us in time."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.recv(deadline - time.monotonic())
        except (EOFError, ConnectionResetError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def open_client():
    """Factory: ``open_client(port, name=None) -> RawClient``; with a name it
    also joins.  All are closed at teardown."""
    clients: list[RawClient] = []

    def make(port: int, name: str | None = None) -> RawClient:
        client = RawClient(port)
        clients.append(client)
        if name is not None:
            client.join(name)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def connect(server, open_client):
    """Factory: ``connect(name=None) -> RawClient`` to the ``server`` fixture."""

    def make(name: str | None = None, port: int | None = None) -> RawClient:
        return open_client(port or server.port, name)

    return make


def client_argv(port: int, name: str) -> list[str]:
    """The terminal client's command line."""
    return [sys.executable, "-m", "tcpserver", f"--name={name}", f"--port={port}"]


class PipedClient:
    """A client subprocess with stdin kept open; its output lines collected."""

    def __init__(self, port: int, name: str) -> None:
        self.proc = subprocess.Popen(client_argv(port, name), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.lines = {"out": [], "err": []}
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._collect, args=(key, stream), daemon=True)
                         for key, stream in (("out", self.proc.stdout),
                                             ("err", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _collect(self, key: str, stream) -> None:
        for line in stream:
            with self._lock:
                self.lines[key].append(line.rstrip("\n"))

    def text(self, key: str = "out") -> str:
        with self._lock:
            return "\n".join(self.lines[key])

    def expect(self, pattern: str, key: str = "out", timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text(key), re.MULTILINE)
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in client std{key}:\n{self.text(key)}\n"
                             f"stderr:\n{self.text('err')}")

    def type(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the exit and for all its output; return the exit code."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def finish(self, timeout: float = 10.0) -> int:
        """Close stdin (end of input) and return the exit code."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.wait(timeout)

    def close(self) -> None:
        """Kill if still running; close the pipes once their readers are done."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def piped():
    """Factory ``piped(port, name) -> PipedClient``; all killed at teardown."""
    started: list[PipedClient] = []

    def start(port: int, name: str) -> PipedClient:
        client = PipedClient(port, name)
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()


TIME_LIMIT = 180  # seconds; a backstop, every wait in the tests has its own timeout


@pytest.fixture(autouse=True)
def time_limit():
    """Fail a test that hangs instead of hanging the run."""
    def expired(signum, frame):
        raise TimeoutError(f"test ran over {TIME_LIMIT} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIME_LIMIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


_SESSION_STATE: list[str] = []


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch) -> Path:
    """Each test's own XDG_STATE_HOME, so a server started without --db (a
    launcher, ``chatroom`` bare) never touches the user's room database."""
    path = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    return path


def pytest_configure(config):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # For session-wide fixtures too (the per-test one above overrides it).
    _SESSION_STATE.append(tempfile.mkdtemp(prefix="chatroom-state-"))
    os.environ["XDG_STATE_HOME"] = _SESSION_STATE[0]


def pytest_unconfigure(config):
    for path in _SESSION_STATE:
        shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    # In CI a skipped test is a test that did not run: fail the run.
    skipped = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") == "true" and skipped and skipped.stats.get("skipped"):
        session.exitstatus = 1
