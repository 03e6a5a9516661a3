"""The chat server: one thread, one selectors loop, non-blocking sockets.

Each loop iteration (``_step``):

1. waits in the selector;
2. reads what is ready and feeds whole frames to the room's rules
   (``rules.Room``), which stage room events in the room log;
3. commits the log (one transaction for the turn), then appends the
   committed frames to the shared ``RoomStream`` once each (never once per
   member): nobody is sent an event the log does not hold;
4. flushes (``outbound.Outbound``): every client with pending bytes gets them
   in one ``send``.

What is not the loop lives elsewhere: what is sent and when in ``outbound``,
a connection's tokens and timeouts in ``pacing``, the rules in ``rules``,
storage in ``roomlog`` and its implementations, admission counts in
``admission``, deadlines in ``timers``, start-up in ``startup``.  What stays
here is the loop itself: accepting, reading, timers, closing and shutdown.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import signal
import socket
import sys
import time

from tcpserver import protocol, settings
from tcpserver.admission import Admission
from tcpserver.client_state import Client
from tcpserver.inbound import Inbound
from tcpserver.listener import Listener
from tcpserver.outbound import SETTLE_MAX, Outbound
from tcpserver.pacing import next_deadline
from tcpserver.roomlog import MemoryLog, RoomLog
from tcpserver.rules import Room
from tcpserver.timers import Deadlines

log = logging.getLogger(__name__)

# select() cannot watch descriptors at or above FD_SETSIZE.
FD_SETSIZE = 1024
# How often the room's own clock runs (presence in a large room, at most
# ~4 a second) and a paused listener is looked at.  Per-client timers are
# deadlines in a heap (timers.Deadlines), not a scan.
TICK = 0.25
# How long a client we are closing gets to read its last frame and hang up.
CLOSE_GRACE = 2.0
# Retention work per timer tick (a step deletes at most 1000 events).
PRUNE_BUDGET = 0.01

_BACKENDS = {
    "auto": selectors.DefaultSelector,
    "select": selectors.SelectSelector,
    "poll": getattr(selectors, "PollSelector", None),
    "epoll": getattr(selectors, "EpollSelector", None),
}

_LISTENER = "listener"
_WAKEUP = "wakeup"
_STDIN = "stdin"


class ChatServer:
    """The room's sockets.  ``serve_forever()`` runs until SIGINT/SIGTERM or
    ``quit``.  Implements ``rules.Outbox`` for the room's rules."""

    def __init__(self, host: str, port: int, limits: settings.Limits,
                 backend: str = "auto", trusted=settings.DEFAULT_TRUSTED_PROXIES,
                 roomlog: RoomLog | None = None) -> None:
        selector_class = _BACKENDS[backend]
        if selector_class is None:
            raise ValueError(f"the {backend} backend is not available on this platform")
        self.limits = limits
        self.backend = backend
        self.trusted = tuple(ipaddress.ip_network(t, strict=False) if isinstance(t, str) else t
                             for t in trusted)
        self.selector = selector_class()
        self.listener = Listener(host, port, self.selector, _LISTENER)
        self.server_address = self.listener.address

        self.clients: dict[int, Client] = {}  # by fd
        self._input_ready: set[Client] = set()  # buffered requests may go on
        self.admission = Admission(limits, self.trusted)
        self.deadlines = Deadlines()
        if roomlog is None:
            roomlog = MemoryLog(limits.max_frame, limits.history, limits.history)
        self.log = roomlog
        self.out = Outbound(self.selector, limits, roomlog, drop=self._drop,
                            internal_error=self._internal_error,
                            input_ready=self._input_ready.add)
        self.streaming = self.out.streaming  # members reading the room stream
        presence = roomlog.make_presence()  # None: this process is the whole room
        roomlog.attach(self.selector)  # a networked log's sockets join the loop
        self.room = Room(limits, roomlog, self, self.trusted, presence)
        self.inbound = Inbound(self.selector, limits, self.room, self.out, self.deadlines,
                               close=self._start_closing, drop=self._drop,
                               input_ready=self._input_ready.add)
        # Counters for --metrics-port, kept whether or not it is served; the
        # log holds them, as it alone sees what it stored (Redis: acknowledged).
        self.stats = roomlog.stats
        self.now = time.monotonic()
        self._next_tick = self.now
        self.stopping = False
        self._stop_requested = False
        self._shutdown_deadline = 0.0

    # --- running -------------------------------------------------------

    def serve_forever(self, watch_stdin: bool = False) -> int:
        """Serve until asked to stop, then shut down gracefully; return 0."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.selector.register(wake_r, selectors.EVENT_READ, _WAKEUP)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        # The handlers stay installed after the loop: restoring the defaults
        # would let a late second signal kill a server that is exiting 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if watch_stdin:
            self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, _STDIN)
        log.info("listening on %s:%d", *self.server_address)
        log.info("room log: %s; epoch %s, last seq %d", self.log.describe(), self.log.epoch,
                 self.log.last_seq)
        try:
            while not (self.stopping and not self.clients):
                self._step()
                if self._stop_requested and not self.stopping:
                    self._begin_shutdown()
                if self.stopping and self.now >= self._shutdown_deadline:
                    break
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for client in list(self.clients.values()):
                self._close_now(client)
            self.selector.close()
            self.log.close()
            wake_r.close()
            wake_w.close()
            if not self.stopping:
                self.listener.close()
        log.info("stopped")
        return 0

    def _on_signal(self, signum, frame) -> None:
        # Only set flags: the wakeup fd makes select() return at once.
        if self.stopping:
            # A second Ctrl-C: the operator does not want to wait.
            self._shutdown_deadline = 0.0
        self._stop_requested = True

    def _read_stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            # EOF on the terminal must not stop the server; just stop watching.
            self.selector.unregister(sys.stdin.fileno())
            return
        if any(line.strip() == b"quit" for line in data.splitlines()):
            log.info("quit typed on the console")
            self._stop_requested = True

    def _step(self) -> None:
        timeout = self._select_timeout()
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            events = []
        self.now = time.monotonic()
        for key, mask in events:
            tag = key.data
            if tag is _LISTENER:
                for sock, ip in self.listener.accept(self.now):
                    self._admit(sock, ip)
            elif tag is _WAKEUP:
                _drain(key.fileobj)
            elif tag is _STDIN:
                self._read_stdin()
            elif not isinstance(tag, Client):
                tag.on_ready(mask)  # the room log's own connection (Redis)
            elif not tag.closed:  # it may have been closed earlier in this batch
                try:
                    if mask & selectors.EVENT_READ:
                        self.inbound.on_readable(tag, self.now)
                    if mask & selectors.EVENT_WRITE and not tag.closed:
                        self.out.flush(tag)
                except Exception:
                    self._internal_error(tag)
        for client in list(self._input_ready):
            self._input_ready.discard(client)
            if not client.closed:
                try:
                    self.inbound.process(client, self.now)
                except Exception:
                    self._internal_error(client)
        self._commit()
        self.out.flush_all(self.now)
        # Timers last, as the room log expects (its tick, then its flush);
        # what they queue (pings, wake-ups) makes the next select not wait.
        self._run_timers()
        self.log.flush()

    def _internal_error(self, client: Client) -> None:
        # A bug met by one client must not stop the room: drop that client.
        log.exception("%s: internal error; dropping the client", client)
        self._drop(client, "hung_up")

    def _select_timeout(self) -> float | None:
        if self._stop_requested and not self.stopping:
            return 0
        if self._input_ready or self.log.staged:
            return 0
        flush_at = self.out.flush_due()
        if flush_at == 0.0:
            return 0  # evictions during the last flush left work to do
        wake = self.deadlines.next_time()
        if flush_at is not None:
            wake = flush_at if wake is None else min(wake, flush_at)
        if self.clients or self.stopping or self.listener.paused_until or self.log.timed:
            wake = self._next_tick if wake is None else min(wake, self._next_tick)
        if wake is None:
            return None  # nothing can time out: sleep until something happens
        return max(0.0, wake - time.monotonic())

    # --- accepting -----------------------------------------------------

    def _admit(self, sock: socket.socket, ip: str) -> None:
        fd = sock.fileno()
        if self.backend == "select" and fd >= FD_SETSIZE:
            return self._refuse(sock, ip, "server_full",
                                "the server has no room for another connection")
        if len(self.clients) >= self.limits.max_clients:
            return self._refuse(sock, ip, "server_full", "the server is full")
        refusal = self.admission.refusal(ip)
        if refusal is not None:
            return self._refuse(sock, ip, *refusal)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = Client(sock, ip, self.now, self.limits)
            self.selector.register(sock, selectors.EVENT_READ, client)
        except (OSError, ValueError) as exc:
            return self._refuse(sock, ip, "server_full", f"cannot watch connection: {exc}")
        self.clients[fd] = client
        self.admission.admitted(client)
        self.stats.accepted += 1
        self.deadlines.schedule(client, next_deadline(client, self.limits))
        log.debug("connect from %s (fd %d)", ip, fd)

    def _refuse(self, sock: socket.socket, ip: str, code: str, message: str) -> None:
        self.stats.refuse(code)
        self.admission.refuse(sock, ip, self.out.error_frame(code, message), message, self.now)

    # --- rules.Outbox: output goes to self.out, the rest is the loop's -----

    def send(self, client: Client, frame: bytes, reply: bool = False) -> None:
        self.out.send(client, frame, reply)

    def replay(self, client: Client, first: int, last: int) -> None:
        self.out.replay(client, first, last)

    def broadcast(self, frame: bytes) -> None:
        self.out.broadcast(frame)

    def follow(self, client: Client) -> None:
        self.out.follow(client)
        # Joined: the hello timeout no longer applies.  Without this every
        # member would be woken once, hello_timeout after it connected.
        self.deadlines.reschedule(client, next_deadline(client, self.limits))

    def leaving(self, client: Client) -> None:
        self.out.leaving(client, self.now)

    def close(self, client: Client) -> None:
        self._start_closing(client)

    def drop(self, client: Client) -> None:
        self._close_now(client)

    def address_admitted(self, client: Client, address: str) -> bool:
        return self.admission.at_hello(client, address)

    def _commit(self) -> None:
        """Make this turn's room events durable, then put them on the stream."""
        self.out.publish(self.room.commit(), self.now)
        if self.log.take_reset():
            self._restart_members()
        self.out.end_leavers(self.now)

    # --- leaving and closing -------------------------------------------

    def _drop(self, client: Client, reason: str) -> None:
        """The connection is gone or useless: close it now."""
        if client.closed:
            return
        self.room.leave(client, reason)
        self._close_now(client)

    def _start_closing(self, client: Client, deadline: float | None = None) -> None:
        """Send what is queued, then close: at ``deadline`` at the latest
        (default: CLOSE_GRACE from now)."""
        client.closing = True
        client.close_deadline = self.now + CLOSE_GRACE if deadline is None else deadline
        self.deadlines.schedule(client, client.close_deadline)
        self.out.dirty.add(client)

    def _close_now(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.room.leave(client, "hung_up")  # a no-op unless still a member
        self.clients.pop(client.fd, None)
        self.out.forget(client)
        self._input_ready.discard(client)
        self.admission.released(client)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        log.debug("closed %s", client)

    # --- timers and shutdown -------------------------------------------

    def _run_timers(self) -> None:
        """Fire the deadlines that are due, then the room's clock."""
        now = self.now
        for client in self.deadlines.pop_due(now):
            try:
                self.inbound.on_deadline(client, now)
            except Exception:
                self._internal_error(client)
            if not client.closed:
                self.deadlines.schedule(client, next_deadline(client, self.limits))
        if now >= self._next_tick:
            self._next_tick = now + TICK
            self.listener.resume_if_due(now, self.stopping)
            self.room.tick(now)
            self.admission.flush_log(now)
            self._prune()
            self.log.tick(now)

    def _prune(self) -> None:
        """Retention, in small steps: more than one only while the steps are
        quick, so the loop never stops for long."""
        deadline = time.monotonic() + PRUNE_BUDGET
        while self.log.prune() and time.monotonic() < deadline:
            pass

    def _restart_members(self) -> None:
        """The log lost the transcript and began a new epoch: close every
        member after a ``shutdown`` notice, so that each reconnects and its
        welcome names the new epoch (the page then says a new transcript
        starts)."""
        log.warning("new epoch %s: closing %d clients so they rejoin", self.log.epoch,
                    len(self.clients))
        frame = protocol.encode_frame(
            {"type": "shutdown", "message": "the room's history was lost; reconnect to "
             "continue in a new transcript"}, self.limits.max_frame)
        self.out.broadcast(frame)  # counted as delivered, like the orderly notice
        self._close_all(frame, self.now + CLOSE_GRACE)

    def _settle_log(self) -> None:
        """Before the shutdown notice: let a log that publishes elsewhere
        (Redis) deliver what it published, at most SETTLE_MAX seconds, so
        members still get every event accepted before the notice.  Only the
        log's own sockets are served meanwhile."""
        deadline = time.monotonic() + SETTLE_MAX
        while not self.log.settled and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.05):
                if key.data is _WAKEUP:
                    _drain(key.fileobj)
                elif not isinstance(key.data, (Client, str)):
                    key.data.on_ready(mask)
            self._commit()
            self.log.flush()

    def _begin_shutdown(self) -> None:
        """Stop accepting, tell everyone, and let the loop flush and close."""
        log.info("shutting down: %d clients", len(self.clients))
        self.stopping = True
        self._shutdown_deadline = self.now + self.limits.shutdown_grace
        self.listener.stop()
        self._commit()
        self._settle_log()
        frame = protocol.encode_frame({"type": "shutdown",
                                       "message": "the server is shutting down"},
                                      self.limits.max_frame)
        # Members get the notice after every room event accepted before it.
        self.out.broadcast(frame)
        self._close_all(frame, self._shutdown_deadline)

    def _close_all(self, frame: bytes, deadline: float) -> None:
        """Send every client not yet closing ``frame`` (just put on the room
        stream) last, then close it by ``deadline``; the room is empty."""
        for client in list(self.clients.values()):
            if client.closing:
                continue
            self.out.send_last(client, frame)
            self._start_closing(client, deadline)
        self.room.forget_all()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except (BlockingIOError, InterruptedError):
        pass
