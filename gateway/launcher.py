"""``chatroom`` with no --name: the chat server as a child process, the
gateway in this one, started and stopped together; the room stays up.

Start-up order: the server first (its ``listening on HOST:PORT`` line gives
the real port, so ``--port 0`` works), then the gateway pointed at it.  If
either cannot start, the reason is one line and the exit status 1.

A server that dies unexpectedly (killed, or a non-zero exit) is restarted
on the same port after a back-off (``RestartPolicy``: 0.5 s doubling to
30 s, back to 0.5 s once a server has stayed up for a minute).  The gateway
keeps serving meanwhile; its ``/health`` is 503 until the new server
answers.  Five deaths within 60 s is a crash loop: one line, exit 1.  A
server that exits 0 was stopped on purpose (e.g. SIGTERM sent to it alone):
the gateway stops with it, exit 0.

Ctrl-C or SIGTERM sends SIGTERM to the server, so every member gets its
``shutdown`` notice (browsers then a 1012 close), then stops the gateway;
exit 0.  (A server that dies closes browsers' sessions with 1011.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from gateway import app
from gateway.children import die_with_parent
from gateway.config import GatewayConfig
from gateway.health import HealthProbe
from tcpserver import protocol

log = logging.getLogger(__name__)

LISTENING = re.compile(rb"listening on (\S+):(\d+)")
# The server imports and binds in well under a second; ten allows a cold,
# busy machine without hanging forever on a wedged child.
START_TIMEOUT = 10.0
# The server's default shutdown grace is 5 s; after twice that it is stuck.
STOP_TIMEOUT = 10.0

# Restart back-off, as systemd and supervisord do it: quick for a one-off
# crash, doubling so a server that keeps dying does not spin the machine,
# capped so a room that comes back is not left down for long.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
# Up this long, a server is healthy: its next death starts the back-off anew.
STABLE_AFTER = 60.0
# This many deaths within the window is a fault a restart will not fix
# (a corrupt database, a port taken by another program): give up and say so.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_WINDOW = 60.0


class RestartPolicy:
    """When to restart a dead server.  No clock of its own: fed times, so
    the rules are tested without waiting."""

    def __init__(self, first: float = FIRST_DELAY, ceiling: float = MAX_DELAY,
                 stable_after: float = STABLE_AFTER, deaths: int = CRASH_LOOP_DEATHS,
                 window: float = CRASH_LOOP_WINDOW) -> None:
        self.first, self.ceiling, self.stable_after = first, ceiling, stable_after
        self.deaths, self.window = deaths, window
        self._recent: collections.deque[float] = collections.deque()
        self._next = first

    def died(self, at: float, uptime: float) -> float | None:
        """Record a death at ``at`` (monotonic seconds) of a server that was up
        ``uptime`` seconds (0 if it never started listening).

        Returns the seconds to wait before restarting it, or None for a
        crash loop (``deaths`` deaths within ``window`` seconds): give up.
        """
        self._recent.append(at)
        while at - self._recent[0] >= self.window:
            self._recent.popleft()
        if len(self._recent) >= self.deaths:
            return None
        if uptime >= self.stable_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.ceiling)
        return delay


class _Server:
    """One chat server child: its process, log pump and start-up state."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[bytes] = []  # its log until it listens, for start errors
        self.listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.listening_at = 0.0
        self.pump = asyncio.create_task(self._pump())
        self.exited = asyncio.create_task(proc.wait())

    @classmethod
    async def spawn(cls, host: str, port: int, log_level: str,
                    server_args: list[str]) -> _Server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tcpserver", "--name=server", f"--host={host}",
            f"--port={port}", f"--log-level={log_level}", *server_args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
        log.info("the chat server started as pid %d", proc.pid)
        return cls(proc)

    async def start(self, stopping: asyncio.Task) -> str:
        """Wait until it listens; return "listening", "exited", "stopping"
        (``stopping`` finished first) or "timeout"."""
        await asyncio.wait({self.listening, self.exited, stopping}, timeout=START_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        if self.listening.done():
            self.listening_at = time.monotonic()
            return "listening"
        if self.exited.done():
            await self.pump  # collect its last words
            return "exited"
        return "stopping" if stopping.done() else "timeout"

    def start_failure(self, port: int) -> str:
        """Why it exited before listening, in a few words (its last log line)."""
        text = b"".join(self.output).decode(errors="replace")
        if "address already in use" in text.lower():
            return f"chat port {port} is busy"
        code = self.proc.returncode
        if code is not None and code < 0:  # killed: its last line is not why
            return _death(code)
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else f"{_death(code or 0)}, no output"

    async def stop(self, failed: bool) -> int:
        """SIGTERM it and wait; return 1 if ``failed``, if it exits with an
        error code or must be killed, else 0."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        try:
            code = await asyncio.wait_for(asyncio.shield(self.exited), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.error("the chat server did not stop within %g s; killing it", STOP_TIMEOUT)
            await self.kill()
            return 1
        # Dying of the SIGTERM we sent is a stop too: the server restores the
        # default handler as it finishes, so a Ctrl-C that reached it first
        # leaves a short window where our SIGTERM kills instead of asking.
        # Another signal killed it before our stop reached it (a crash the
        # supervisor had not yet seen): stopped all the same.
        if code < 0 and code != -signal.SIGTERM and not failed:
            log.warning("the chat server had died (%s)", _death(code))
        elif code > 0 and not failed:
            log.error("the chat server exited with code %d", code)
            return 1
        return 1 if failed else 0

    async def kill(self) -> None:
        """SIGKILL it if it runs; wait for it and its log."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await asyncio.gather(self.exited, self.pump, return_exceptions=True)

    async def _pump(self) -> None:
        """Copy its log to our stderr; resolve ``listening`` with its port."""
        assert self.proc.stdout is not None
        echo = True
        while line := await self.proc.stdout.readline():
            if echo:
                try:
                    sys.stderr.write(line.decode(errors="replace"))
                    sys.stderr.flush()
                except (OSError, ValueError):
                    # Our stderr is gone; keep draining, or the server would
                    # block on a full pipe the next time it logs.
                    echo = False
            if not self.listening.done():
                self.output.append(line)
                match = LISTENING.search(line)
                if match:
                    self.listening.set_result(int(match.group(2)))


Spawn = Callable[[int], Awaitable[_Server]]  # start a server on this port


def run(host: str, chat_port: int, http_port: int, server_args: list[str],
        log_level: str) -> int:
    """Run the chat server and the web gateway until Ctrl-C or SIGTERM.

    ``server_args`` are extra server options (``settings.arguments_to_argv``),
    passed on unchanged to every server started.  Returns 0 after a clean
    stop, 1 if either could not start or the server is in a crash loop (the
    reason logged in one line, e.g. "chat port 10000 is busy").
    """
    try:
        return asyncio.run(_run(host, chat_port, http_port, server_args, log_level))
    except FileNotFoundError as exc:  # the page's assets are missing
        log.error("%s", exc)
        return 1


async def _run(host: str, chat_port: int, http_port: int, server_args: list[str],
               log_level: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    servers: list[_Server] = []  # the current one; the dead are reaped before a restart

    async def spawn(port: int) -> _Server:
        servers[:] = [await _Server.spawn(host, port, log_level, server_args)]
        return servers[0]

    try:
        return await _supervise(host, chat_port, http_port, server_args, spawn, stopping)
    finally:
        for server in servers:  # an exception on the way: never orphan one
            await server.kill()
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _supervise(host: str, chat_port: int, http_port: int, server_args: list[str],
                     spawn: Spawn, stopping: asyncio.Task) -> int:
    try:
        server = await spawn(chat_port)
    except OSError as exc:  # no process at all: out of memory or of PIDs
        log.error("cannot start the chat server: %s", exc.strerror or exc)
        return 1
    outcome = await server.start(stopping)
    if outcome == "exited":
        failure = server.start_failure(chat_port)
        log.error("%s", failure if failure.startswith("chat port")
                  else f"the chat server did not start: {failure}")
        return 1
    if outcome != "listening":
        if outcome == "timeout":
            log.error("the chat server did not start within %g s", START_TIMEOUT)
        return await server.stop(failed=outcome == "timeout")
    port = server.listening.result()  # kept for restarts: --port 0 picked it

    config = GatewayConfig(chat_host=_local(host), chat_port=port, host=host,
                           http_port=http_port, max_frame=_max_frame(server_args))
    try:
        runner, url = await app.start(config)
    except OSError as exc:
        log.error("%s", app.bind_error(host, http_port, exc))
        return await server.stop(failed=True)
    local = _local(host)
    if local != host:  # a wildcard bind: name an address a browser can open
        url = f"http://{f'[{local}]' if ':' in local else local}:{runner.addresses[0][1]}/"
    log.info("chat room ready: open %s in a browser", url)
    try:
        return await _keep_up(server, port, spawn, stopping, runner.app[app.PROBE])
    finally:
        await runner.cleanup()


async def _keep_up(server: _Server, port: int, spawn: Spawn, stopping: asyncio.Task,
                   probe: HealthProbe) -> int:
    """Restart the server whenever it dies, until a stop or a crash loop."""
    policy = RestartPolicy()
    while True:
        await asyncio.wait({server.exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            log.info("stopping")
            # The server first: it tells every member (browsers included,
            # through the gateway) that it is shutting down.
            return await server.stop(failed=False)
        code = server.exited.result()
        if code == 0:
            # Stopped on purpose, e.g. SIGTERM sent to it alone.  (A Ctrl-C
            # reaches it directly too, same process group, and may win the
            # race with ours.)
            log.info("the chat server stopped; stopping the gateway")
            return 0
        probe.forget()  # a cached "ok" would hide the death for a while
        reason, uptime = _death(code), time.monotonic() - server.listening_at
        what = "died"
        while True:
            await server.kill()  # reaped, its log drained
            delay = policy.died(time.monotonic(), uptime)
            if delay is None:
                log.error("the chat server died %d times within %g s (last: %s); giving up",
                          policy.deaths, policy.window, reason)
                return 1
            log.warning("the chat server %s (%s); %s in %g s", what, reason,
                        "restarting it" if what == "died" else "trying again", delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), delay)
            if stopping.done():
                log.info("stopping")
                return 0
            what, uptime = "did not restart", 0.0
            try:
                server = await spawn(port)
            except OSError as exc:  # counts as a death: a crash loop ends it
                reason = f"cannot start a process: {exc.strerror or exc}"
                continue
            outcome = await server.start(stopping)
            if outcome == "listening":
                probe.forget()  # a cached "unavailable" would hide the recovery
                log.info("the chat server is back on port %d", port)
                break
            if outcome == "stopping":
                log.info("stopping")
                return await server.stop(failed=False)
            reason = (f"not listening within {START_TIMEOUT:g} s" if outcome == "timeout"
                      else server.start_failure(port))


def _death(code: int) -> str:
    """How a server ended, from its wait status: "killed by SIGKILL", "exit code 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _local(host: str) -> str:
    """An address to reach ``host`` from this machine (wildcards are not one)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _max_frame(server_args: list[str]) -> int:
    """The server's --max-frame if ``server_args`` changes it, so both agree."""
    for arg in server_args:
        if arg.startswith("--max-frame="):
            return int(arg.split("=", 1)[1])
    return protocol.MAX_FRAME_SIZE
