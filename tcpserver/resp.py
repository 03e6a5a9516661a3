"""Redis connections that live in the server's selector loop.

A ``RedisConnection`` is a non-blocking socket registered in the same
selector as the chat clients, a ``hiredis.Reader`` (the RESP protocol with
no I/O, as our codec is the frame protocol with no I/O) and a FIFO of reply
callbacks.  ``command`` packs a request (``hiredis.pack_command``) into an
output buffer; ``flush``, called by the loop once per turn, writes everything
queued in that turn in ONE ``send`` (pipelining: N commands cost one system
call and one round trip, not N).  Replies arrive in request order (RESP is
strictly FIFO per connection), so each one pops the oldest callback.

Why this and not redis-py in a helper thread: the server is one thread and
one loop, and every piece of room state is touched only by that loop.  A
thread would need locks or a queue plus a wake-up socketpair for every reply,
and its blocking calls would hide latency in a place the loop cannot see.
Here the loop never blocks on Redis: a slow or dead Redis is just a peer
whose replies have not come yet.  (The one bounded wait, at most 2 ms for a
turn's own publications to come back, is ``RedisLog._await_delivery``.)
A blocking read (``XREAD BLOCK``) gets its own connection, where waiting
costs the loop nothing.

Failures: every way a connection can break (refused, reset, EOF, a protocol
error, a reply that never comes) ends in ``_fail``: the socket is closed,
every pending callback gets a ``ConnectionError`` reply, and a reconnect is
tried after a capped backoff (0.5 s doubling to 10 s).  Commands issued while
the connection is not up are answered with the same error at the next
``flush``, never silently dropped.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit

import hiredis

log = logging.getLogger(__name__)

# Reconnect backoff: quick for a restart, capped so a long outage costs
# one attempt every 10 s.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# A connect that has not finished by then is given up (and retried).
CONNECT_TIMEOUT = 5.0
RECV_SIZE = 256 * 1024

Callback = Callable[[Any], None]
ReplyError = hiredis.ReplyError


class RedisAddress:
    """``redis://HOST:PORT/DB`` parsed: ``host``, ``port`` (default 6379),
    ``db`` (default 0).  Raises ValueError for another scheme or a bad DB."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis://HOST:PORT/DB address: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 6379
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} is not a number")
        self.db = int(path or 0)
        self.password = parts.password

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def handshake(self) -> list[tuple]:
        """Commands to send first on every new connection."""
        out = []
        if self.password:
            out.append(("AUTH", self.password))
        if self.db:
            out.append(("SELECT", self.db))
        return out


def call(address: RedisAddress, *commands: tuple, timeout: float = 5.0) -> list[Any]:
    """Send ``commands`` on a new blocking connection and return their
    replies in order (a ReplyError stays in the list).  For start-up only.
    Raises OSError if Redis cannot be reached or hangs up."""
    commands = tuple(address.handshake()) + commands
    reader = hiredis.Reader()
    replies: list[Any] = []
    with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
        sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
        while len(replies) < len(commands):
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
    return replies[len(address.handshake()):]


class RedisConnection:
    """One pipelined, non-blocking connection to Redis.

    ``on_up()`` runs each time the connection (re)opens, before any other
    command: it is where scripts are loaded and blocking reads started.
    ``on_down(reason)`` runs each time it breaks.  The loop calls
    ``on_ready(mask)`` for selector events, ``flush()`` once per turn and
    ``tick(now)`` on its timer.
    """

    def __init__(self, address: RedisAddress, selector: selectors.BaseSelector, name: str,
                 on_up: Callable[[], None] | None = None,
                 on_down: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.selector = selector
        self.name = name
        self.on_up = on_up
        self.on_down = on_down
        self.sock: socket.socket | None = None
        self.state = "down"  # down, connecting, up
        self.reason = "not connected yet"
        self._reader = hiredis.Reader()
        self._out = bytearray()
        self._callbacks: deque[tuple[Callback | None, float]] = deque()
        self._refused: list[Callback] = []  # commands issued while down
        self._writing = False
        self._backoff = BACKOFF_FIRST
        self._retry_at = 0.0
        self._connect_deadline = 0.0
        self._deadline: float | None = None  # a reply that must come by then

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def pending(self) -> int:
        """Replies still awaited."""
        return len(self._callbacks)

    def command(self, *args: Any, callback: Callback | None = None,
                timeout: float = 5.0) -> None:
        """Queue one command.  ``callback(reply)`` gets the reply: bytes,
        int, list, None, a ``ReplyError`` for an error reply, or a
        ``ConnectionError`` if the connection failed first.  A reply later
        than ``timeout`` seconds (plus the time to send it) breaks the
        connection."""
        if self.state != "up":
            if callback is not None:
                self._refused.append(callback)
            return
        self._out += hiredis.pack_command(args)
        self._callbacks.append((callback, timeout))

    def flush(self) -> None:
        """Write what this turn queued, in one send; answer refused commands."""
        if self._refused:
            refused, self._refused = self._refused, []
            error = ConnectionError(f"redis: {self.reason}")
            for callback in refused:
                _call(callback, error)
        if self.state == "up" and self._out and not self._writing:
            self._send()

    def tick(self, now: float) -> None:
        """Reconnect when the backoff has passed; give up a hung connect or
        an overdue reply."""
        if self.state == "down" and now >= self._retry_at:
            self._connect(now)
        elif self.state == "connecting" and now >= self._connect_deadline:
            self._fail("connect timed out")
        elif self.state == "up" and self._deadline is not None and now >= self._deadline:
            self._fail("no reply in time")

    def reconnect_now(self, reason: str) -> None:
        """Drop the connection (pending callbacks get an error) and connect
        again at the next tick, without backoff."""
        self._fail(reason)
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST

    def close(self) -> None:
        """Close for good (server shutdown); pending callbacks get an error."""
        self._fail("closed", retry=False)
        self.state = "closed"

    # --- selector events ---------------------------------------------------

    def on_ready(self, mask: int) -> None:
        """Handle a selector event for this connection's socket."""
        if self.state == "connecting":
            if mask & selectors.EVENT_WRITE:
                self._connected()
            return
        if self.state != "up":
            return
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and self.state == "up":
            self._send()

    # --- internals -----------------------------------------------------------

    def _connect(self, now: float) -> None:
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in self.address.host else socket.AF_INET)
        except OSError as exc:
            return self._schedule_retry(now, f"cannot make a socket: {exc}")
        sock.setblocking(False)
        err = sock.connect_ex((self.address.host, self.address.port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return self._schedule_retry(now, f"connect: {errno.errorcode.get(err, err)}")
        self.sock = sock
        self.state = "connecting"
        self._connect_deadline = now + CONNECT_TIMEOUT
        self.selector.register(sock, selectors.EVENT_WRITE, self)

    def _connected(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._fail(f"connect: {errno.errorcode.get(err, err)}")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.modify(self.sock, selectors.EVENT_READ, self)
        self.state = "up"
        self._reader = hiredis.Reader()
        self._backoff = BACKOFF_FIRST
        log.info("redis %s: connected to %s", self.name, self.address)
        for args in self.address.handshake():
            self.command(*args, callback=self._handshake_reply)
        if self.on_up is not None:
            self.on_up()
        self.flush()

    def _handshake_reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            log.error("redis %s: %s", self.name, reply)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                return self._fail(f"recv: {exc.strerror or exc}")
            if not data:
                return self._fail("Redis closed the connection")
            self._reader.feed(data)
            if len(data) < RECV_SIZE:
                break
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                return self._fail(f"protocol error: {exc}")
            if reply is False:
                break
            if not self._callbacks:
                return self._fail("a reply nobody asked for")
            callback, _ = self._callbacks.popleft()
            # A reply proves the connection alive: the next one is timed
            # from now (and a callback may queue a command, e.g. XREAD).
            self._deadline = None
            _call(callback, reply)
            if self.state != "up":  # the callback closed us
                return
        self._arm_deadline()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            return self._fail(f"send: {exc.strerror or exc}")
        del self._out[:sent]
        writing = bool(self._out)
        if writing != self._writing:
            self._writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.selector.modify(self.sock, events, self)
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        # Only the oldest awaited reply is timed: replies come in order.
        if self._callbacks:
            if self._deadline is None:
                self._deadline = time.monotonic() + self._callbacks[0][1]
        else:
            self._deadline = None

    def _fail(self, reason: str, retry: bool = True) -> None:
        was_up = self.state == "up"
        if self.sock is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        self.state = "down"
        self.reason = reason
        self._out.clear()
        self._writing = False
        self._deadline = None
        callbacks, self._callbacks = self._callbacks, deque()
        if retry:
            self._schedule_retry(time.monotonic(), reason, quiet=not was_up)
        error = ConnectionError(f"redis: {reason}")
        for callback, _ in callbacks:
            _call(callback, error)
        if was_up and retry and self.on_down is not None:
            self.on_down(reason)  # not for a close on purpose

    def _schedule_retry(self, now: float, reason: str, quiet: bool = False) -> None:
        self.state = "down"
        self.reason = reason
        self._retry_at = now + self._backoff
        (log.debug if quiet else log.warning)(
            "redis %s: %s; retrying in %.1f s", self.name, reason, self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)


def _call(callback: Callback | None, reply: Any) -> None:
    if callback is None:
        return
    try:
        callback(reply)
    except Exception:
        # One broken callback must not desynchronise the reply FIFO.
        log.exception("redis reply callback failed")
