"""``chatroom`` with no --name: the chat server as a child process, the
gateway in this one, started and stopped together.

Start-up order: the server first (its ``listening on HOST:PORT`` line gives
the real port, so ``--port 0`` works), then the gateway pointed at it.
Ctrl-C or SIGTERM forwards SIGTERM to the server, so browsers receive its
``shutdown`` notice and a 1012 close, then stops the gateway; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import re
import signal
import sys

from gateway import app
from gateway.config import GatewayConfig
from tcpserver import protocol

log = logging.getLogger(__name__)

LISTENING = re.compile(rb"listening on (\S+):(\d+)")
# The server imports and binds in well under a second; ten allows a cold,
# busy machine without hanging forever on a wedged child.
START_TIMEOUT = 10.0
# The server's default shutdown grace is 5 s; after twice that it is stuck.
STOP_TIMEOUT = 10.0


# From <linux/prctl.h>: ask for a signal when the parent process dies.
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server child, before exec: SIGTERM it if the launcher dies,
    even by SIGKILL, so no orphan keeps the chat port."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a killed launcher leaves the server to be stopped by hand


def run(host: str, chat_port: int, http_port: int, server_args: list[str],
        log_level: str) -> int:
    """Run the chat server and the web gateway until Ctrl-C or SIGTERM.

    ``server_args`` are extra server options (``settings.arguments_to_argv``),
    passed on unchanged.  Returns 0 after a clean stop, 1 if either could
    not start (the reason logged, e.g. "chat port 10000 is busy").
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
    try:
        return await _supervise(host, chat_port, http_port, server_args, log_level, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _supervise(host: str, chat_port: int, http_port: int, server_args: list[str],
                     log_level: str, stop: asyncio.Event) -> int:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tcpserver", "--name=server", f"--host={host}",
        f"--port={chat_port}", f"--log-level={log_level}", *server_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent)
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    output: list[bytes] = []
    pump = asyncio.create_task(_pump(child, listening, output))
    exited = asyncio.create_task(child.wait())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({listening, exited, stopping}, timeout=START_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            if exited.done():
                await pump  # collect the child's last words
                log.error("%s", _start_error(output, chat_port))
                return 1
            if not stopping.done():
                log.error("the chat server did not start within %g s", START_TIMEOUT)
            return await _stop_child(child, exited, failed=not stopping.done())

        config = GatewayConfig(chat_host=_local(host), chat_port=listening.result(), host=host,
                               http_port=http_port, max_frame=_max_frame(server_args))
        try:
            runner, url = await app.start(config)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                log.error("HTTP port %d is busy", http_port)
            else:
                log.error("cannot serve on %s:%d: %s", host, http_port, exc.strerror or exc)
            return await _stop_child(child, exited, failed=True)
        local = _local(host)
        if local != host:  # a wildcard bind: name an address a browser can open
            port = runner.addresses[0][1]
            url = f"http://{f'[{local}]' if ':' in local else local}:{port}/"
        log.info("chat room ready: open %s in a browser", url)
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                # The server ended first: a Ctrl-C reaches it directly (same
                # process group) and may win the race with ours; 0 is clean.
                code = exited.result()
                if code != 0:
                    log.error("the chat server exited unexpectedly (code %d)", code)
                    return 1
                log.info("the chat server stopped; stopping the gateway")
                return 0
            log.info("stopping")
            # The server first: it tells every member (browsers included,
            # through the gateway) that it is shutting down.
            return await _stop_child(child, exited, failed=False)
        finally:
            await runner.cleanup()
    finally:
        if child.returncode is None:  # an exception on the way: never orphan it
            child.kill()
            await exited
        stopping.cancel()
        await asyncio.gather(pump, stopping, return_exceptions=True)


async def _pump(child: asyncio.subprocess.Process, listening: asyncio.Future[int],
                output: list[bytes]) -> None:
    """Copy the child's log to our stderr; resolve ``listening`` with its port."""
    assert child.stdout is not None
    echo = True
    while line := await child.stdout.readline():
        if echo:
            try:
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()
            except (OSError, ValueError):
                # Our stderr is gone; keep draining, or the server would
                # block on a full pipe the next time it logs.
                echo = False
        if not listening.done():
            output.append(line)
            match = LISTENING.search(line)
            if match:
                listening.set_result(int(match.group(2)))


def _start_error(output: list[bytes], port: int) -> str:
    text = b"".join(output).decode(errors="replace")
    if "Address already in use" in text or "address already in use" in text:
        return f"chat port {port} is busy"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"the chat server did not start: {lines[-1] if lines else 'no output'}"


async def _stop_child(child: asyncio.subprocess.Process, exited: asyncio.Task,
                      failed: bool) -> int:
    """SIGTERM the server and wait; return 1 if ``failed`` or it did not exit cleanly."""
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
    try:
        code = await asyncio.wait_for(asyncio.shield(exited), STOP_TIMEOUT)
    except asyncio.TimeoutError:
        log.error("the chat server did not stop within %g s; killing it", STOP_TIMEOUT)
        child.kill()
        await exited
        return 1
    # Dying of the SIGTERM we sent is a stop too: the server restores the
    # default handler as it finishes, so a Ctrl-C that reached it first
    # leaves a short window where our SIGTERM kills instead of asking.
    clean = code in (0, -signal.SIGTERM)
    if not clean and not failed:
        log.error("the chat server exited with code %d", code)
    return 1 if failed or not clean else 0


def _local(host: str) -> str:
    """An address to reach ``host`` from this machine (wildcards are not one)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _max_frame(server_args: list[str]) -> int:
    """The server's --max-frame if ``server_args`` changes it, so both agree."""
    for arg in server_args:
        if arg.startswith("--max-frame="):
            return int(arg.split("=", 1)[1])
    return protocol.MAX_FRAME_SIZE
