"""The terminal client: ``chatroom --name=bob --port=N [--host=H]``.

In a terminal (stdin and stdout both TTYs) a prompt_toolkit prompt
``[bob@127.0.0.1]> `` stays on the last line while the room scrolls above it,
so an incoming message never garbles what is being typed.  Otherwise every
line read from stdin is sent (commands work too; empty lines are skipped),
each one only after the server has echoed the one before, resending it if
it was rate-limited; at end of input the client quits and exits once the
server has closed the connection, so nothing piped in is lost.  A line
whose echo a drop cut off is sent again once back only if the room did
not get it: its echo may lie in the part of the gap the fill leaves
unshown, and is looked for there (``tcpserver/client_echo.py``); a
``/history`` cut off is aimed again once back (first at that part).
Input is handled in ``tcpserver/client_input.py``, one connection in
``tcpserver/client_conn.py``; what is shown, one line per event,
is described in ``tcpserver/display.py``: room lines on stdout, diagnostics
(``! ...``) on stderr.

When the connection drops, or the server announces ``shutdown`` (it is
restarting or stopping), the client reconnects by itself with capped,
jittered backoff, rejoins with the same name presenting the ``resume``
token of its last welcome, and fills the gap with ``history`` (``after`` the
last event shown; what that could not replay, up to 1000 more, page by page
with ``before``), showing each missed event once (``tcpserver/transcript.py``);
a longer gap is counted in one line and ``/history`` shows the rest.  It does not come back
after a refusal (``flooding``, ``bad_frame``) or when its name is refused.

Exit status: 0 after ``/quit``, end of input, Ctrl-C at the prompt, or
Ctrl-C while reconnecting; 1 if the server cannot be reached at start, is
not a chat server (say, the web gateway's HTTP port) or closed us for a
refusal; 2 if the server refuses the name; 130 if a piped client is
interrupted while connected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import sys
from typing import Callable

from tcpserver import display, protocol
from tcpserver.cli import DEFAULT_PORT
from tcpserver.client_conn import Connection, NotChatServer
from tcpserver.client_echo import ABSENT, AGAIN, FOUND, EchoSearch
from tcpserver.transcript import Transcript

log = logging.getLogger(__name__)

# A reachable server accepts within milliseconds; 5 s allows a slow link
# without leaving someone who typed the wrong port waiting.
CONNECT_TIMEOUT = 5.0
# The server's own default hello timeout: no welcome by then means none.
WELCOME_TIMEOUT = 10.0
# After quit, how long to wait for our leave, and then for the close.
QUIT_WAIT = 2.0
# How long a piped line waits for its echo before we give up on it.
ECHO_TIMEOUT = 10.0
# After a rate_limited error, wait this long before resending: the server
# refills at least one token a second unless configured unusually low.
RATE_LIMIT_PAUSE = 1.0
MAX_ATTEMPTS = 30
# Reconnect backoff: a restart takes about a second, so start fast; cap at
# 15 s so a long outage costs the server one attempt per client per 15 s;
# jitter +-20% so clients dropped together do not return together.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_JITTER = 0.5, 15.0, 0.2

EXIT_OK, EXIT_LOST, EXIT_REFUSED = 0, 1, 2
_NAME_ERRORS = ("name_taken", "name_invalid", "bad_message")
# Closing errors after which coming back would be refused again.
_NO_RETURN = frozenset({"bad_frame", "flooding"})

Reply = Callable[[dict], bool]
# What deliver() sends: a frame, or a function that makes it at each
# attempt (None: nothing to send any more), so a retry can be re-aimed.
Outgoing = dict | Callable[[], dict | None]


class JoinRefused(protocol.RemoteProtocolError):
    """The server answered hello with an error (``code``, ``message``)."""


class Unreachable(Exception):
    """No TCP connection to the server; ``args[0]`` is the OSError or TimeoutError."""


_rng = random.Random()


def backoff(attempt: int, rng: random.Random = _rng) -> float:
    """Seconds to wait before reconnect ``attempt`` (0, 1, ...): BACKOFF_FIRST
    doubling up to BACKOFF_MAX, each within +-BACKOFF_JITTER of that."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 16))
    return base * rng.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


class Session:
    """Our membership of the room, across connections: joins, shows what
    the server sends, sends ours, and reconnects when the link drops."""

    def __init__(self, name: str, host: str, port: int, show: display.Show) -> None:
        self.name, self.host, self.port, self.show = name, host, port, show
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.transcript = Transcript()
        self.conn: Connection | None = None
        self.label = ""
        self.resume: str | None = None  # token of the last welcome
        self.ready = asyncio.Event()  # joined and the gap filled: send away
        self.reconnecting = False
        self.quiet: set[str] = set()  # error codes handled without a line
        self.shutdown = False  # the last connection announced shutdown
        self.refused: str | None = None  # a closing error code that forbids a return
        self.quitting = False
        self._members: list = []
        self.who_prefix = ""  # the PREFIX of the /who being answered
        self._members_quiet = False  # the welcome's list after a rejoin: not shown
        self._waiter: tuple[asyncio.Future, Reply] | None = None
        # The highest seq shown when deliver() last sent: the echo of what
        # it sent is above it, so an older message replayed after a rejoin
        # is never taken for that echo.  sent_as is our label then: the
        # echo names it even if we come back from another address.
        self.echo_floor = 0
        self.sent_as = ""
        # The server's clock (ms) minus our monotonic one, from this
        # connection's live events (the largest: the least delayed); None
        # until one came.  live_from: the welcome's last_seq.
        self.clock_ms: float | None = None
        self.live_from = 0
        self._search: EchoSearch | None = None  # a search whose page is due
        self._search_page: asyncio.Future | None = None

    async def send(self, message: dict) -> None:
        """Send one message now.  Raises OSError if not connected."""
        if self.conn is None or self.conn.ended.is_set():
            raise ConnectionError("not connected")
        await self.conn.send(message)

    async def join(self) -> None:
        """Connect, say hello (with our resume token, if any) and read up to
        the welcome.  Raises JoinRefused, NotChatServer, ConnectionError
        (closed before the welcome), OSError, FrameError or TimeoutError;
        Unreachable if no connection could be opened."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unreachable(exc) from exc
        conn = Connection(reader, writer)
        try:
            hello = {"type": "hello", "name": self.name}
            if self.resume:
                hello["resume"] = self.resume
            await conn.send(hello)
            welcome = await asyncio.wait_for(self._welcome(conn), WELCOME_TIMEOUT)
        except BaseException:
            await conn.close()
            raise
        rejoin = bool(self.label)
        self.conn, self.shutdown, self.label = conn, False, welcome["label"]
        self.who_prefix = ""  # a /who cut off by the drop
        self.resume = welcome.get("resume")
        self.clock_ms, self.live_from = None, welcome["last_seq"]
        self._search = None  # a page asked on the old connection will not come
        lines, request = self.transcript.welcome(welcome, rejoin)
        self._print(lines)
        if rejoin:
            # One line when back; /who lists the members.
            count = welcome.get("count", len(welcome["members"]))
            self.show(f"* reconnected as {display.clean(self.label)} ({count} in the room)")
        else:
            self.show(f"* joined as {display.clean(self.label)}")
            if welcome.get("large"):
                self.show(f"* {welcome.get('count', '?')} in the room (/who lists them)")
        self._members = list(welcome["members"])
        self._members_quiet = rejoin
        if not welcome["more"]:
            self._show_members()
        if request:
            try:
                await conn.send(request)
            except OSError:
                await conn.close()
                raise
        else:
            self.ready.set()

    async def _welcome(self, conn: Connection) -> dict:
        while True:
            msg = await conn.read()
            if msg is None:
                raise ConnectionError("the server closed the connection")
            if msg["type"] == "error":
                raise JoinRefused(msg["code"], msg["message"])
            if msg["type"] == "ping":
                await self._pong(conn, msg)
            elif msg["type"] == "welcome":
                conn.welcomed = True
                return msg
            else:
                log.debug("ignored %s before welcome", msg["type"])

    async def stay(self) -> int:
        """Show what the server sends; rejoin whenever the connection drops.

        Returns the exit status once the session cannot go on (a refusal,
        or the name refused on rejoining).  Runs until cancelled otherwise.
        """
        while True:
            await self._receive(self.conn)
            self.ready.clear()
            if self.quitting:
                return EXIT_OK
            if self.refused:
                self.show("! the server closed the connection", err=True)
                return EXIT_LOST
            why = ("the server is restarting or stopping" if self.shutdown
                   else "the connection was lost")
            self.show(f"! {why}; reconnecting (Ctrl-C to stop)", err=True)
            status = await self._rejoin()
            if status is not None:
                return status

    async def _rejoin(self) -> int | None:
        """Join again with backoff; an exit status if we must give up."""
        self.reconnecting = True
        attempt = 0
        while True:
            await asyncio.sleep(backoff(attempt))
            attempt += 1
            try:
                await self.join()
            except JoinRefused as exc:
                if exc.code in _NAME_ERRORS:
                    self.show(f"! cannot rejoin as {self.name!r}: {display.clean(exc.message)} "
                              f"({display.clean(exc.code)})", err=True)
                    return EXIT_REFUSED
                log.debug("rejoin refused: %s", exc.message)  # e.g. server_full: try again
                continue
            except NotChatServer as exc:
                self.show(f"! {self.where} is no longer a chat server ({exc.args[0]})",
                          err=True)
                return EXIT_LOST
            except (Unreachable, OSError, protocol.FrameError, asyncio.TimeoutError) as exc:
                log.debug("rejoin attempt %d: %s", attempt, exc)
                continue
            self.reconnecting = False
            return None

    async def _receive(self, conn: Connection) -> None:
        """Handle server messages until ``conn`` ends."""
        try:
            while (msg := await conn.read()) is not None:
                await self._handle(conn, msg)
        except (OSError, protocol.FrameError) as exc:
            log.debug("connection lost: %s", exc)
        finally:
            conn.ended.set()
            await conn.close()

    async def _handle(self, conn: Connection, msg: dict) -> None:
        kind = msg["type"]
        transcript = self.transcript
        search = self._search
        if search is not None and search.take(msg):
            if not search.waiting:  # the page is over (its pong, or an error)
                self._search = None
                if self._search_page is not None and not self._search_page.done():
                    self._search_page.set_result(None)
            return  # a page of the gap read for an echo: not shown
        if kind in ("message", "join", "leave"):
            if msg["seq"] > self.live_from:
                offset = msg["ts"] - asyncio.get_running_loop().time() * 1000
                self.clock_ms = offset if self.clock_ms is None else max(self.clock_ms, offset)
            self._print(transcript.event(msg))
        elif kind == "history":
            self._print(transcript.history(msg))
        elif kind == "private":
            self.show(display.private(msg, self.label))
        elif kind == "members":
            self._members.extend(msg["members"])
            if msg.get("cursor") is not None:
                # One page of a large room's list: show it, say there is more.
                self.show(display.members(self._members, msg.get("count"), True,
                                          self.who_prefix))
                self._members, self.who_prefix = [], ""
            elif not msg["more"]:
                self._show_members()
        elif kind == "error" and msg["code"] == "unknown_seq" and transcript.filling:
            self._print(transcript.unknown_seq())
        elif kind == "error" and msg["code"] == "room_unavailable" and transcript.filling:
            self.show(display.error(msg["code"], msg["message"]), err=True)
            self._print(transcript.unavailable())
        elif kind == "error":
            if msg["code"] in _NO_RETURN:
                self.refused = msg["code"]
            if msg["code"] in self.quiet:
                log.debug("server: %s", msg["message"])
            else:
                self.show(display.error(msg["code"], msg["message"]), err=True)
        elif kind == "shutdown":
            self.shutdown = True
            self.show(display.error("shutdown", msg["message"]), err=True)
        elif kind == "ping":
            await self._pong(conn, msg)
        for request in transcript.take_requests():
            try:
                await conn.send(request)
            except OSError as exc:
                log.debug("history request not sent: %s", exc)  # the drop ends this link
        if not transcript.filling:
            self.ready.set()
        waiter = self._waiter
        if waiter and not waiter[0].done():
            if kind == "error" and msg["code"] != "unknown_seq":
                waiter[0].set_result(msg["code"])
            elif waiter[1](msg):
                waiter[0].set_result("ok")

    def _print(self, lines) -> None:
        for line in lines:
            self.show(line.text, err=line.err, dim=line.dim)

    def _show_members(self) -> None:
        if not self._members_quiet:
            self.show(display.members(self._members, prefix=self.who_prefix))
        self._members, self.who_prefix, self._members_quiet = [], "", False

    async def _pong(self, conn: Connection, ping: dict) -> None:
        reply = {"type": "pong"}
        if ping.get("token") is not None:
            reply["token"] = ping["token"]
        try:
            await conn.send(reply)
        except OSError as exc:
            log.debug("pong not sent: %s", exc)

    async def deliver(self, message: Outgoing, is_reply: Reply,
                      timeout: float = ECHO_TIMEOUT) -> bool:
        """Send ``message`` until the frame ``is_reply`` accepts arrives.

        ``message`` may be a function making the frame at each attempt
        (None: nothing to send).  Waits while reconnecting.  Returns True if
        the reply came; False after another error (shown), no reply within
        ``timeout``, or nothing to send.  A rate-limited frame, or one the
        room could not store (``room_unavailable``), is resent after a
        pause; while a rate-limit streak lasts the server drops frames
        without another error, so a resent frame with no reply is resent
        again.  If the connection drops first, the gap filled after the
        rejoin may hold the reply; if not, the frame is sent again, but a
        ``say`` only once ``client_echo.EchoSearch`` found that the room
        did not get it (its echo may lie in the part of the gap the fill
        left unshown).
        """
        resent = False
        search: EchoSearch | None = None  # a say cut off by a drop: was it said?
        for _ in range(MAX_ATTEMPTS):
            await self.ready.wait()
            if search is not None:
                verdict = await self._find_echo(search)
                if verdict == FOUND:
                    return True
                if verdict is None:  # the link dropped again: search once back
                    continue
                if verdict == AGAIN:
                    await asyncio.sleep(RATE_LIMIT_PAUSE)
                    continue
                if verdict != ABSENT:
                    self.show(f"! cannot tell whether a line sent before the drop reached "
                              f"the room ({search.why}): sending it again", err=True)
                search = None
            conn = self.conn
            frame = message() if callable(message) else message
            if frame is None:
                return False
            future = asyncio.get_running_loop().create_future()
            self._waiter = (future, is_reply)
            self.echo_floor, self.sent_as = self.transcript.last_seq, self.label
            restarts = self.transcript.restarts  # the rejoin may start the numbers over
            try:
                await conn.send(frame)
                ended = asyncio.ensure_future(conn.ended.wait())
                await asyncio.wait({future, ended}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
            except OSError as exc:
                # A failed write means a broken link: wait for the receiver
                # to see it end, then go the way of any drop.
                log.debug("send failed: %s", exc)
                await conn.ended.wait()
            dropped_at = asyncio.get_running_loop().time()
            if not future.done() and conn.ended.is_set():
                # Published before the drop? The gap fill will show it.
                await self.ready.wait()
            self._waiter = None
            result = future.result() if future.done() else (
                "closed" if conn.ended.is_set() else "timeout")
            if result == "ok":
                return True
            if result == "closed":
                if frame["type"] == "say":
                    # Or it lies in a hole the fill left: look there first.
                    search = EchoSearch(self.echo_floor, self.sent_as, is_reply, restarts,
                                        dropped_at)
                continue
            # room_unavailable: the room could not store it (e.g. disk
            # full) and did not publish it; it recovers by itself.
            if result in ("rate_limited", "room_unavailable") or (result == "timeout"
                                                                   and resent):
                resent = True
                await asyncio.sleep(RATE_LIMIT_PAUSE)
                continue
            if result == "timeout":
                self.show(f"! no reply from the server within {timeout:g} s", err=True)
            return False
        return False

    async def _find_echo(self, search: EchoSearch) -> str | None:
        """Run ``search`` on this connection, a page at a time: its verdict,
        or None if the link dropped first (run it again once back)."""
        conn = self.conn
        search.begin(self.transcript.welcome_last, self.clock_ms)
        try:
            while (frames := search.requests(self.transcript)) is not None:
                page = self._search_page = asyncio.get_running_loop().create_future()
                # _handle routes the page's frames to the search until it is over.
                self._search = search
                for frame in frames:
                    await conn.send(frame)
                ended = asyncio.ensure_future(conn.ended.wait())
                await asyncio.wait({page, ended}, timeout=ECHO_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if not page.done():
                    return None if conn.ended.is_set() else search.timed_out()
            log.debug("echo search: %s after %d pages", search.verdict, search.pages)
            return search.verdict
        except OSError as exc:
            log.debug("echo search cut off: %s", exc)
            await conn.ended.wait()
            return None
        finally:
            # A page given up on stays routed until its pong: late, it
            # must not be taken for a /history page.
            self._search_page = None

    async def quit(self) -> None:
        """Leave: send quit until our leave comes back, then wait for the
        close (at most QUIT_WAIT each).  Not connected: nothing to do.

        The server lets quit through its rate limit, so the room sees us
        leave rather than hang up.
        """
        self.quitting = True
        conn = self.conn
        if not self.ready.is_set() or conn is None:
            return
        if await self.deliver({"type": "quit"}, lambda m: m["type"] == "leave"
                              and m["member"] == self.label, timeout=QUIT_WAIT):
            # The server closes once our leave is sent: when it has, nothing
            # before it is left unshown.
            try:
                await asyncio.wait_for(conn.ended.wait(), QUIT_WAIT)
            except asyncio.TimeoutError:
                log.debug("the server did not close within %g s of our leave", QUIT_WAIT)


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        # One address family or several: open_connection may merge errors.
        return "connection refused"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).lower()


async def _first_join(session: Session) -> int | None:
    """Join once; on failure print one line and return the exit status."""
    where, name = session.where, session.name
    try:
        await session.join()
    except Unreachable as exc:
        print(f"chatroom: cannot reach the chat server at {where} ({_why(exc.args[0])})",
              file=sys.stderr)
        return EXIT_LOST
    except JoinRefused as exc:
        print(f"chatroom: cannot join as {name!r}: {display.clean(exc.message)} "
              f"({display.clean(exc.code)})", file=sys.stderr)
        return EXIT_REFUSED if exc.code in _NAME_ERRORS else EXIT_LOST
    except NotChatServer as exc:
        print(f"chatroom: {where} is not a chat server port ({exc.args[0]}); "
              f"the chat port is --port, default {DEFAULT_PORT}", file=sys.stderr)
        return EXIT_LOST
    except asyncio.TimeoutError:
        print(f"chatroom: no welcome from {where} within {WELCOME_TIMEOUT:g} s; is it "
              f"the chat port? (--port, default {DEFAULT_PORT})", file=sys.stderr)
        return EXIT_LOST
    except (OSError, protocol.FrameError) as exc:
        print(f"chatroom: the chat server at {where} did not let us in ({exc})",
              file=sys.stderr)
        return EXIT_LOST
    return None


async def _main(name: str, host: str, port: int, holder: dict) -> int:
    from tcpserver import client_input

    terminal = os.isatty(0) and os.isatty(1)
    session = holder["session"] = Session(name, host, port, display.printer(terminal))
    failed = await _first_join(session)
    if failed is not None:
        return failed
    stay = asyncio.ensure_future(session.stay())
    ui = asyncio.ensure_future(client_input.interactive(session) if terminal
                               else client_input.piped(session))
    try:
        done, _ = await asyncio.wait({stay, ui}, return_when=asyncio.FIRST_COMPLETED)
        return EXIT_OK if ui in done else stay.result()
    finally:
        # Before Python 3.12, wait_for can swallow a cancel that races its
        # inner future finishing (CPython gh-86296), and the task would go
        # on reconnecting: cancel until both are done.
        while not (stay.done() and ui.done()):
            stay.cancel()
            ui.cancel()
            await asyncio.wait({stay, ui}, timeout=0.2)
        for task in (stay, ui):
            if not task.cancelled():
                task.exception()  # retrieved: the result above said what counts
        if session.conn is not None:
            await session.conn.close()


def run(name: str, host: str, port: int) -> int:
    """Join the room at ``host:port`` as ``name`` from this terminal or pipe.

    Returns the exit status (see the module docstring); never raises for
    network trouble, which is reported in one line on stderr.
    """
    logging.basicConfig(level=logging.WARNING, format="chatroom: %(message)s")
    holder: dict = {}
    try:
        return asyncio.run(_main(name, host, port, holder))
    except KeyboardInterrupt:
        session = holder.get("session")
        if session is not None and session.reconnecting:
            return EXIT_OK  # nothing to leave: stopping is the answer to "Ctrl-C to stop"
        return 130
