"""``python -m gateway --workers N``: N gateway processes serving one port.

Each worker is a whole gateway (``python -m gateway --worker=K``) whose
listening socket has SO_REUSEPORT, so the kernel spreads new connections
over the workers; a session stays in the worker that accepted it.  This
process, the parent, serves nothing itself:

* it checks the port is free (one line and exit 1 if not, as with one
  worker), picks it if ``--http-port 0``, and keeps it reserved with a
  bound, never-listening SO_REUSEPORT socket, so the port stays ours while
  a worker restarts;
* it makes a temporary ``PROMETHEUS_MULTIPROC_DIR`` for the workers, so any
  worker's /metrics and /health add up all of them (``gateway.metrics``),
  and removes it at exit;
* it starts the workers, each in its own process group (a terminal's
  Ctrl-C reaches only the parent, which passes it on once) and set to get
  SIGTERM if the parent dies, even by SIGKILL; it logs ``serving on
  http://HOST:PORT/ with N workers`` once every worker is listening;
* a worker that dies is restarted after ``RESTART_DELAY``; more than
  ``MAX_DEATHS`` deaths in ``DEATH_WINDOW`` seconds stop everything, exit 1;
* SIGTERM or SIGINT is forwarded to every worker (each closes its sessions
  with 1001 and exits); the exit code is 0 if every worker stopped cleanly.

How many: the relay is CPU-bound and each worker uses one core at most, so
use the cores the chat server (one core, single-threaded) leaves free:
``os.cpu_count() - 1``, at least 1.  More workers than cores only add
memory.  Limits such as ``--max-sessions-per-ip`` apply per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from prometheus_client.multiprocess import mark_process_dead

from gateway import app
from gateway.children import die_with_parent
from gateway.config import GatewayConfig
from gateway.metrics import MULTIPROC_ENV

log = logging.getLogger("gateway")

READY = b"ready\n"  # what a worker writes on stdout once it listens
# Importing aiohttp and binding takes well under a second; this allows a
# cold, busy machine without hanging forever on a wedged worker.
START_TIMEOUT = 15.0
# A worker's own stop: aiohttp's 5 s shutdown plus each session's 5 s close.
STOP_TIMEOUT = 15.0
RESTART_DELAY = 0.5
MAX_DEATHS = 5
DEATH_WINDOW = 60.0


def run(config: GatewayConfig, argv: list[str]) -> int:
    """Serve with ``config.workers`` processes until SIGTERM or SIGINT.

    ``argv`` is the command line this process got; each worker gets it with
    the chosen port and its index added.  Returns 0 after a clean stop, 1
    if the port is busy, a worker could not start, or workers kept dying.
    """
    try:
        reservation = reserve_port(config.host, config.http_port)
    except OSError as exc:
        log.error("%s", app.bind_error(config.host, config.http_port, exc))
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    try:
        port = reservation.getsockname()[1]
        return asyncio.run(Supervisor(config, argv, port, metrics_dir).run())
    finally:
        reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def reserve_port(host: str, port: int) -> socket.socket:
    """Return a socket bound (not listening) to ``host``:``port`` with
    SO_REUSEPORT, so workers can bind the port beside it and nobody else can.

    Raises OSError (EADDRINUSE) if something already holds the port,
    including another SO_REUSEPORT group, which a plain bind detects.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = (address[0], probe.getsockname()[1], *address[2:])
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
    except BaseException:
        reservation.close()
        raise
    return reservation


class Supervisor:
    """Starts, watches, restarts and stops the workers."""

    def __init__(self, config: GatewayConfig, argv: list[str], port: int,
                 metrics_dir: str) -> None:
        self.config = config
        self.argv = argv
        self.port = port
        self.env = {**os.environ, MULTIPROC_ENV: metrics_dir}
        self.metrics_dir = metrics_dir
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.deaths: list[float] = []
        self.stop = asyncio.Event()
        self.signal = signal.SIGTERM

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            codes = await asyncio.gather(*(self._start(k) for k in range(self.config.workers)))
            failed = [code for code in codes if code is not None]
            if failed:
                await self._stop_all()
                return failed[0] or 1
            host = self.config.host
            url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"
            log.info("serving on %s with %d workers (pids %s)", url, len(self.workers),
                     " ".join(str(p.pid) for p in self.workers.values()))
            return await self._watch()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self.stop.is_set():
            log.info("signal %d again: passing it on", sig)
            self._signal_all(sig)
        self.signal = sig
        self.stop.set()

    async def _start(self, index: int) -> int | None:
        """Start worker ``index`` and wait until it listens; None when it
        does, else its exit code (it is then gone)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *self.argv, f"--http-port={self.port}",
            f"--worker={index}", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, env=self.env, start_new_session=True,
            preexec_fn=die_with_parent)
        self.workers[index] = proc
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
            log.error("worker %d did not start within %g s", index, START_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if line == READY:
            return None
        code = await proc.wait()
        del self.workers[index]
        mark_process_dead(proc.pid, self.metrics_dir)
        return code or 1

    async def _watch(self) -> int:
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while True:
                exits = {asyncio.create_task(proc.wait()): index
                         for index, proc in self.workers.items()}
                done, _ = await asyncio.wait([stopping, *exits],
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in exits:
                    task.cancel()
                if stopping in done:
                    return await self._stop_all()
                for task in done:
                    if not await self._died(exits[task]):
                        await self._stop_all()
                        return 1
        finally:
            stopping.cancel()

    async def _died(self, index: int) -> bool:
        """Worker ``index`` exited on its own: restart it; False to give up."""
        proc = self.workers.pop(index)
        mark_process_dead(proc.pid, self.metrics_dir)
        pid, code = proc.pid, proc.returncode
        while True:
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW] + [now]
            if len(self.deaths) > MAX_DEATHS:
                log.error("worker %d (pid %s) exited with %s; %d deaths in %g s, giving up",
                          index, pid, code, len(self.deaths), DEATH_WINDOW)
                return False
            log.warning("worker %d (pid %s) exited with %s; restarting it", index, pid, code)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), RESTART_DELAY)
            if self.stop.is_set():
                return True  # the watch loop stops the rest
            code = await self._start(index)
            if code is None:
                log.info("worker %d restarted (pid %d)", index, self.workers[index].pid)
                return True
            pid = "?"  # it died while starting: count it as another death

    def _signal_all(self, sig: int) -> None:
        for proc in self.workers.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _stop_all(self) -> int:
        """Pass the stop signal on and wait; 0 if every worker exited 0."""
        if self.workers:
            log.info("stopping %d workers", len(self.workers))
        self._signal_all(self.signal)
        codes = []
        for index, proc in list(self.workers.items()):
            try:
                codes.append(await asyncio.wait_for(proc.wait(), STOP_TIMEOUT))
            except asyncio.TimeoutError:
                log.error("worker %d (pid %d) did not stop in %g s; killing it",
                          index, proc.pid, STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                codes.append(await proc.wait())
        self.workers.clear()
        log.info("stopped")
        return 0 if all(code == 0 for code in codes) else 1
