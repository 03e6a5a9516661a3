"""``python -m gateway.demo`` (``chatroom-demo``): one room over two nodes,
on one machine.

Starts, in order, each as a child process:

1. Debian's ``redis-server`` on a loopback port (given, or a free one),
   appendonly persistence on, its files in ``STATE/redis``;
2. two chat servers, A and B, ``--redis redis://127.0.0.1:PORT/0 --room
   ROOM``, on free ports, each with ``--metrics-port``;
3. two web gateways, gateway 1 talking to server A and gateway 2 to server
   B, each trusting nginx (``--trusted-proxy 127.0.0.1/32``);
4. nginx (``gateway/deploy/nginx.conf.template`` rendered into a temporary
   prefix), load-balancing the page and its WebSockets over both gateways.

Then it logs the URL and waits.  Ctrl-C (or SIGTERM) stops everything it
started, by PID and in reverse order; so does the death of any part (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway import deploy
from gateway.children import die_with_parent
from tcpserver import cli, settings

log = logging.getLogger("gateway.demo")

DEFAULT_PORT = 8000
DEFAULT_ROOM = "demo"
# Each part gets this long to come up, and to stop before it is killed.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
_SERVING = re.compile(r"serving on (http://\S+?:\d+/)")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/chatroom/demo``, else ``~/.local/state/chatroom/demo``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "chatroom" / "demo"


class StartError(Exception):
    """A part of the demo did not come up; ``str()`` says which and why."""


class Child:
    """One started program: its output goes to ``LOGS/NAME.log``."""

    def __init__(self, name: str, argv: list[str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "wb") as out:
            # Its own session: Ctrl-C reaches only the demo, which then stops
            # the parts in order rather than all at once.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        log.info("%s started as pid %d (log: %s)", name, self.proc.pid, self.log_path)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first match of ``pattern`` in the output; StartError if the
        program exits or START_TIMEOUT passes first."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                return match
            if not self.alive or time.monotonic() > deadline:
                raise StartError(self.failure("did not start"))
            time.sleep(0.05)

    def failure(self, what: str) -> str:
        code = self.proc.poll()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        status = "still running" if code is None else f"exit code {code}"
        return f"{self.name} {what} ({status}); last output: {' | '.join(tail) or 'none'}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig``; SIGKILL if it has not exited after STOP_TIMEOUT."""
        if not self.alive:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %g s; killing it", self.name,
                        self.proc.pid, STOP_TIMEOUT)
            self.proc.kill()
            self.proc.wait()


class Demo:
    """The parts, started by ``start`` and stopped by ``stop``."""

    def __init__(self, state: Path, port: int, redis_port: int | None, room: str,
                 log_level: str) -> None:
        self.state = state
        self.port = port
        self.redis_port = redis_port
        self.room = room
        self.log_level = log_level
        self.children: list[Child] = []
        self.prefix: Path | None = None
        self.url = ""

    def start(self) -> str:
        """Start every part; return the URL.  Raises StartError (the parts
        already started keep running until ``stop``)."""
        # Checked first, so a busy port starts nothing (nginx binds last; a
        # program taking the port meanwhile still stops the demo, in one line).
        if not deploy.port_is_free("127.0.0.1", self.port):
            raise StartError(f"port {self.port} is busy (choose another with --port)")
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        redis_url = self._start_redis(logs)
        python = [sys.executable, "-m"]
        chat_ports = []
        for name in ("server-a", "server-b"):
            server = self._spawn(name, python + [
                "tcpserver", "--name=server", "--host=127.0.0.1", "--port=0",
                f"--redis={redis_url}", f"--room={self.room}", "--metrics-port=0",
                f"--log-level={self.log_level}"], logs)
            chat_ports.append(int(server.wait_line(_LISTENING).group(2)))
            log.info("%s: chat port %d, %s", name, chat_ports[-1],
                     server.wait_line(_METRICS).group(1))
        gateways = []
        for number, chat_port in enumerate(chat_ports, 1):
            gateway = self._spawn(f"gateway-{number}", python + [
                "gateway", "--host=127.0.0.1", "--http-port=0", "--chat-host=127.0.0.1",
                f"--chat-port={chat_port}", "--trusted-proxy=127.0.0.1/32",
                f"--log-level={self.log_level}"], logs)
            url = gateway.wait_line(_SERVING).group(1)
            gateways.append(url.removeprefix("http://").rstrip("/"))
            log.info("gateway %d: %s, talking to the chat server on port %d", number, url,
                     chat_port)
        self.prefix = Path(tempfile.mkdtemp(prefix="chatroom-nginx-"))
        conf = deploy.render_nginx(self.prefix, f"127.0.0.1:{self.port}", gateways)
        nginx = self._spawn("nginx", deploy.nginx_argv(conf), logs)
        if not deploy.wait_nginx(conf, nginx.proc.pid, START_TIMEOUT, lambda: nginx.alive):
            error_log = self.prefix / "error.log"
            detail = error_log.read_text(errors="replace").strip().splitlines()[-1:] \
                if error_log.exists() else []
            raise StartError(nginx.failure("did not start") + "; " + " ".join(detail))
        self.url = f"http://127.0.0.1:{self.port}/"
        return self.url

    def _start_redis(self, logs: Path) -> str:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StartError("redis-server is not installed (Debian: apt-get install "
                             "redis-server)")
        port = self.redis_port or deploy.free_port()
        data = self.state / "redis"
        data.mkdir(parents=True, exist_ok=True)
        # appendonly: every acknowledged event survives a restart of Redis
        # (fsync once a second; "always" trades throughput for the last second).
        redis = self._spawn("redis", [
            redis_server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--logfile", ""], logs)
        if not deploy.wait_port("127.0.0.1", port, START_TIMEOUT, lambda: redis.alive):
            raise StartError(redis.failure(f"did not start on port {port}"))
        self.redis_port = port
        log.info("redis-server on 127.0.0.1:%d, data in %s", port, data)
        return f"redis://127.0.0.1:{port}/0"

    def _spawn(self, name: str, argv: list[str], logs: Path) -> Child:
        child = Child(name, argv, logs)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        """The first part that has exited, if any."""
        return next((c for c in self.children if not c.alive), None)

    def stop(self) -> None:
        """Stop every part, newest first (nginx before the gateways, the
        servers before Redis), each by its PID; remove nginx's prefix."""
        for child in reversed(self.children):
            # SIGQUIT is nginx's graceful stop; the others take SIGTERM.
            child.stop(signal.SIGQUIT if child.name == "nginx" else signal.SIGTERM)
            log.info("%s stopped", child.name)
        self.children.clear()
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog=cli.prog_name("gateway.demo", "chatroom-demo"),
        description="One chat room over two nodes on this machine: redis-server, two chat "
        "servers, two web gateways and nginx in front.  Ctrl-C stops them all.")
    parser.add_argument("--port", type=cli.port, default=DEFAULT_PORT,
                        help=f"nginx's port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks "
                        "a free one)")
    parser.add_argument("--redis-port", type=cli.port, default=0,
                        help="redis-server's port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--state", type=Path, default=None,
                        help="directory for Redis's data and every part's log "
                        f"(default {default_state_dir()})")
    parser.add_argument("--room", default=DEFAULT_ROOM,
                        help=f"the room's name in Redis (default {DEFAULT_ROOM})")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl-C or SIGTERM; return 0 after a clean stop, 1
    if a part could not start or died (the reason in one line)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings.check_room(args.room)  # before Redis starts: a usage error, exit 2
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    port = args.port or deploy.free_port()
    demo = Demo(args.state or default_state_dir(), port, args.redis_port or None, args.room,
                args.log_level)
    stop: list[int] = []

    def on_signal(signum, frame) -> None:
        stop.append(signum)
        if not demo.url:
            raise KeyboardInterrupt  # still starting: stop waiting for a part

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    code = 0
    try:
        url = demo.start()
        log.info("chat room ready: open %s in a browser (terminal: chatroom --name=YOU "
                 "--port=PORT with a chat port above); Ctrl-C stops it", url)
        while not stop:
            dead = demo.dead()
            if dead is not None:
                log.error("%s", dead.failure("died"))
                code = 1
                break
            time.sleep(0.2)
    except StartError as exc:
        log.error("%s", exc)
        code = 1
    except (OSError, ValueError) as exc:
        log.error("cannot start the demo: %s", exc)
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        if stop:
            log.info("stopping")
        demo.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
