"""The chat server: one thread, one selectors loop, non-blocking sockets.

Each loop iteration (``_step``):

1. waits in the selector;
2. reads what is ready and feeds whole frames to the room's rules
   (``rules.Room``), which stage room events in the room log;
3. commits the log (one transaction for the turn), then appends the
   committed frames to the shared ``RoomStream`` once each (never once per
   member): nobody is sent an event the log does not hold;
4. flushes: every client with pending bytes gets them in one ``send``.
   Only a client whose kernel buffer is full registers ``EVENT_WRITE``, so an
   idle server sleeps and a busy one makes no per-recipient selector calls.

A client's private frames (welcome, errors, replies) wait in its own queue,
each tagged with the room offset at which it was queued, so they interleave
with the room stream exactly in the order the server produced them.

What is not socket work lives elsewhere: the rules in ``rules``, storage in
``roomlog`` and its implementations, admission counts in ``admission``,
deadlines in ``timers``, start-up in ``startup``.  What stays here is every
path a byte takes through the loop, which share one object's state.
"""

from __future__ import annotations

import errno
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
from tcpserver.room import RoomStream
from tcpserver.roomlog import MemoryLog, RoomLog, StorageError
from tcpserver.rules import Room
from tcpserver.timers import Deadlines

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
# A connect burst fills the accept queue in microseconds; the book's 5 drops
# connections under load.  The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096
# Time one loop turn may spend accepting (or refusing) connections: a
# connect flood then costs the members a bounded slice of each turn, not a
# stall, while a join storm still drains the kernel's accept queue before it
# overflows (an overflowing queue drops SYNs, which clients retry only after
# 1 s, then 3 s, ...).  The rest wait in the queue for the next turn.
ACCEPT_BUDGET_S = 0.005
# select() cannot watch descriptors at or above FD_SETSIZE.
FD_SETSIZE = 1024
# How often the room's own clock runs (presence in a large room, at most
# ~4 a second) and a paused listener is looked at.  Per-client timers are
# deadlines in a heap (timers.Deadlines), not a scan.
TICK = 0.25
# How long a client we are closing gets to read its last frame and hang up.
CLOSE_GRACE = 2.0
# A history reply is read from the log in pieces of about this size, as the
# client drains them: large enough for few reads, small enough that one
# client's replay pins little memory.
REPLAY_CHUNK = 256 * 1024
# Longest wait at shutdown for the room log to deliver what it published.
SETTLE_MAX = 1.0
# Retention work per timer tick (a step deletes at most 1000 events).
PRUNE_BUDGET = 0.01
# While a client's requests wait (a reply still unsent), its socket is read
# only until this much input is buffered; then TCP pushes back.  The same
# bound applies to input waiting for the rate limit.
PAUSED_INPUT_BYTES = 2 * protocol.MAX_FRAME_SIZE
# Slack for float rounding when a throttled client wakes for its token.
_TOKEN_EPSILON = 1e-9

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
        self.listener = socket.create_server((host, port), backlog=LISTEN_BACKLOG,
                                             family=_family(host), reuse_port=False)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self.selector.register(self.listener, selectors.EVENT_READ, _LISTENER)
        self._accept_paused_until = 0.0

        self.clients: dict[int, Client] = {}  # by fd
        self.streaming: set[Client] = set()  # clients reading the room stream
        self.dirty: set[Client] = set()  # clients with new private frames
        self._leaving: list[Client] = []  # stream them up to their own leave
        self._leaving_since = 0.0
        self._input_ready: set[Client] = set()  # buffered requests may go on
        self.admission = Admission(limits, self.trusted)
        self.deadlines = Deadlines()
        self.stream = RoomStream()
        if roomlog is None:
            roomlog = MemoryLog(limits.max_frame, limits.history, limits.history)
        self.log = roomlog
        presence = roomlog.make_presence()  # None: this process is the whole room
        roomlog.attach(self.selector)  # a networked log's sockets join the loop
        self.room = Room(limits, roomlog, self, self.trusted, presence)
        self._flushed_end = 0
        # Counters for --metrics-port, kept whether or not it is served; the
        # log holds them, as it alone sees what it stored (Redis: acknowledged).
        self.stats = roomlog.stats
        self._delivered_upto = 0  # stats.stream_events already counted as delivered
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
                self._accept()
            elif tag is _WAKEUP:
                _drain(key.fileobj)
            elif tag is _STDIN:
                self._read_stdin()
            elif not isinstance(tag, Client):
                tag.on_ready(mask)  # the room log's own connection (Redis)
            elif not tag.closed:  # it may have been closed earlier in this batch
                try:
                    if mask & selectors.EVENT_READ:
                        self._on_readable(tag)
                    if mask & selectors.EVENT_WRITE and not tag.closed:
                        self._flush(tag)
                except Exception:
                    self._internal_error(tag)
        for client in list(self._input_ready):
            self._input_ready.discard(client)
            if not client.closed:
                try:
                    self._process_input(client)
                except Exception:
                    self._internal_error(client)
        self._commit()
        self._flush_all()
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
        if self.stream.end > self._flushed_end or self.dirty or self._input_ready \
                or self.log.staged:
            return 0  # evictions during the last flush left work to do
        wake = self.deadlines.next_time()
        if self.clients or self.stopping or self._accept_paused_until or self.log.timed:
            wake = self._next_tick if wake is None else min(wake, self._next_tick)
        if wake is None:
            return None  # nothing can time out: sleep until something happens
        return max(0.0, wake - time.monotonic())

    # --- accepting -----------------------------------------------------

    def _accept(self) -> None:
        # One readiness event may stand for thousands of connections during
        # a connect burst; take them for at most ACCEPT_BUDGET_S, then serve
        # the members.  The listener stays readable: the next turn goes on.
        deadline = time.monotonic() + ACCEPT_BUDGET_S
        while time.monotonic() < deadline:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener would stay readable and
                    # spin the loop, so stop watching it for a moment.
                    log.warning("accept paused for 1 s: %s", exc)
                    self.selector.unregister(self.listener)
                    self._accept_paused_until = self.now + 1.0
                    return
                log.info("accept failed: %s", exc)  # e.g. ECONNABORTED
                continue
            self._admit(sock, addr[0])

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
        self.deadlines.schedule(client, self._next_deadline(client))
        log.debug("connect from %s (fd %d)", ip, fd)

    def _refuse(self, sock: socket.socket, ip: str, code: str, message: str) -> None:
        self.stats.refuse(code)
        self.admission.refuse(sock, ip, self._error_frame(code, message), message, self.now)

    # --- reading -------------------------------------------------------

    def _on_readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("%s: recv failed: %s", client, exc)
            return self._drop(client, "hung_up")
        if not data:
            return self._drop(client, "hung_up")
        client.last_recv = self.now
        client.pinged = False
        if client.closing:
            return  # read only to see the peer hang up
        client.decoder.receive_data(data)
        self._process_input(client)

    def _process_input(self, client: Client) -> None:
        """Handle the whole frames buffered, in order, until a reply makes
        the rest wait or the client is out of tokens ("fake lag": frames over
        the rate wait their turn instead of being refused)."""
        decoder = client.decoder
        busy = throttled = False
        while not client.closing:
            if client.reply_bytes or client.hold_at is not None or client.waiting:
                # One reply at a time: the next request waits until this one
                # is sent, so a client cannot queue unbounded output.
                busy = True
                break
            message = client.held
            if message is None:
                try:
                    payload = decoder.next_payload()
                except protocol.FrameError as exc:
                    return self._fail(client, exc.code, exc.message, "protocol_error")
                if payload is None:
                    break
                try:
                    message = protocol.parse_client_message(payload)
                except protocol.MessageError as exc:
                    message = exc  # garbage costs a token too
            # quit costs nothing, but it waits behind the frames sent before
            # it, which are delivered first.
            if (isinstance(message, protocol.MessageError) or message["type"] != "quit") \
                    and not self._take_token(client):
                client.held = message
                throttled = True
                break
            client.held = None
            if isinstance(message, protocol.MessageError):
                self._send_error(client, message.code, message.message)
                continue
            try:
                self.room.handle(client, message)
            except protocol.MessageError as exc:
                self._send_error(client, exc.code, exc.message)
            except protocol.LocalProtocolError:
                # Only possible with a small --max-frame: the reply would not fit.
                self._send_error(client, "bad_message", "too long for this server's frames")
        if client.closed:
            return
        if throttled and not client.closing:
            # Flooding is a backlog that takes too long to work off at the
            # rate, not time spent waiting: a stall bunches a polite
            # sender's frames, but only a flooder's pile keeps growing.
            limits = self.limits
            bound = max(1, int(limits.msg_rate * limits.flood_seconds))
            if 1 + decoder.whole_frames(bound) > bound:
                return self._fail(client, "flooding", f"disconnected for flooding: over {bound} "
                                  f"messages waiting for the rate limit ({limits.msg_rate:g} a "
                                  "second)", "flooding")
            client.wake_at = self.now + (1 - client.tokens) / self.limits.msg_rate
            self.deadlines.schedule(client, client.wake_at)
        waiting = busy or throttled
        if waiting:
            # Stop reading once enough waits: TCP pushes back on the sender.
            if client.reading and decoder.buffered >= PAUSED_INPUT_BYTES:
                self._set_reading(client, False)
        elif not client.reading:
            self._set_reading(client, True)
        if decoder.buffered and not waiting and not client.closing:
            if not client.partial_since:
                client.partial_since = self.now
                self.deadlines.schedule(client, self.now + self.limits.frame_timeout)
        else:
            client.partial_since = 0.0

    def _take_token(self, client: Client) -> bool:
        """Token bucket: take one; False if the client must wait for it."""
        limits = self.limits
        tokens = min(limits.msg_burst,
                     client.tokens + (self.now - client.token_time) * limits.msg_rate)
        client.token_time = self.now
        if tokens >= 1 - _TOKEN_EPSILON:
            client.tokens = max(0.0, tokens - 1)
            return True
        client.tokens = tokens
        return False

    def _read_stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            # EOF on the terminal must not stop the server; just stop watching.
            self.selector.unregister(sys.stdin.fileno())
            return
        if any(line.strip() == b"quit" for line in data.splitlines()):
            log.info("quit typed on the console")
            self._stop_requested = True


    # --- output --------------------------------------------------------

    # --- rules.Outbox ----------------------------------------------------

    def send(self, client: Client, frame: bytes, reply: bool = False) -> None:
        """Queue an encoded frame for one client, after the room bytes so far."""
        client.queue.append((self.stream.end, frame, reply))
        if reply:
            client.reply_bytes += len(frame)
        else:
            client.queued_bytes += len(frame)
        self.dirty.add(client)

    def replay(self, client: Client, first: int, last: int) -> None:
        if first <= last:
            client.replay = [first, last]
            client.hold_at = self.stream.end

    def broadcast(self, frame: bytes) -> None:
        self.stream.append(frame)
        self.stats.stream_events += 1

    def follow(self, client: Client) -> None:
        client.pos = self.stream.end
        self.streaming.add(client)
        # Joined: the hello timeout no longer applies.  Without this every
        # member would be woken once, hello_timeout after it connected.
        self.deadlines.reschedule(client, self._next_deadline(client))

    def leaving(self, client: Client) -> None:
        if not self._leaving:
            self._leaving_since = self.now
        self._leaving.append(client)

    def close(self, client: Client) -> None:
        self._start_closing(client)

    def drop(self, client: Client) -> None:
        self._close_now(client)

    def address_admitted(self, client: Client, address: str) -> bool:
        return self.admission.at_hello(client, address)

    # --- output --------------------------------------------------------

    def _commit(self) -> None:
        """Make this turn's room events durable, then put them on the stream."""
        frames = self.room.commit()
        for frame in frames:
            self.stream.append(frame)
        self.stats.stream_events += len(frames)
        if self.log.take_reset():
            self._restart_members()
        # A log that publishes elsewhere (Redis) gives a leaver's own leave
        # back later: its stream ends once that came (at most SETTLE_MAX).
        if self._leaving and (self.log.settled
                              or self.now >= self._leaving_since + SETTLE_MAX):
            for client in self._leaving:
                if client.stop_at is None:
                    client.stop_at = self.stream.end
                self.dirty.add(client)  # closing: its FIN can go now
            self._leaving.clear()

    def _error_frame(self, code: str, message: str) -> bytes:
        return protocol.encode_frame({"type": "error", "code": code, "message": message},
                                     self.limits.max_frame)

    def _send_error(self, client: Client, code: str, message: str) -> None:
        self.send(client, self._error_frame(code, message))

    def _flush_all(self) -> None:
        """Send pending bytes to every client that has some."""
        stream_end = self.stream.end
        if stream_end > self._flushed_end:
            self._flushed_end = stream_end
            # Deliveries counted once per flush, not per recipient.
            stats = self.stats
            stats.delivered += (stats.stream_events - self._delivered_upto) * len(self.streaming)
            self._delivered_upto = stats.stream_events
            targets = list(self.streaming)
            targets.extend(self.dirty.difference(self.streaming))
        else:
            targets = list(self.dirty)
        self.dirty.clear()
        for client in targets:
            if client.closed:
                continue
            try:
                if client.writing:
                    # Blocked on a full kernel buffer: EVENT_WRITE will tell
                    # us.  Only check the backlog, so a stalled reader is evicted.
                    self._check_backlog(client)
                else:
                    self._flush(client)
            except Exception:
                self._internal_error(client)
        if not self.stream.buffered:
            return  # nothing to trim: an idle turn must not visit every member
        if self.streaming:
            self.stream.trim(min(c.pos for c in self.streaming))
        else:
            self.stream.trim(self.stream.end)

    def _flush(self, client: Client) -> None:
        stream = self.stream
        if client.hold_at is not None:
            self._feed_replay(client)
            if client.closed:
                return
        end = stream.end if client.stop_at is None else client.stop_at
        hold = client.hold_at
        if hold is not None:
            end = min(end, hold)  # room bytes after the replay wait for it
        pos = client.pos
        views: list[memoryview] = []
        buffers: list = []
        for offset, frame, _ in client.queue:
            if hold is not None and offset > hold:
                break
            if pos is not None and pos < offset:
                view = stream.view(pos, offset)
                views.append(view)
                buffers.append(view)
                pos = offset
            buffers.append(frame)
        if pos is not None and pos < end:
            view = stream.view(pos, end)
            views.append(view)
            buffers.append(view)
        if not buffers:
            return self._flushed(client)
        try:
            if len(buffers) == 1:
                sent = client.sock.send(buffers[0])
            else:
                sent = client.sock.sendmsg(buffers[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            sent = -1
            failure = exc
        finally:
            for view in views:
                view.release()
        if sent < 0:
            log.debug("%s: send failed: %s", client, failure)
            return self._drop(client, "hung_up")
        had_replies = client.reply_bytes
        client.advance(sent)
        self.stats.bytes_out += sent
        if had_replies and not client.reply_bytes:
            self._input_ready.add(client)  # requests waiting behind the reply
        if client.pending(end):
            if not self._check_backlog(client):
                return
            if not client.writing:
                client.writing = True
                self._update_interest(client)
        elif client.hold_at is not None:
            self.dirty.add(client)  # the next piece of the replay, next turn
        else:
            self._flushed(client)

    def _feed_replay(self, client: Client) -> None:
        """Queue the next piece of a history reply once the client has taken
        everything before it; release the hold once all of it is queued."""
        hold = client.hold_at
        if client.pos != hold or (client.queue and client.queue[0][0] <= hold):
            return
        if client.replay is None:
            client.hold_at = None
            self._input_ready.add(client)
            return
        first, last = client.replay
        try:
            first, blob = self.log.chunk(first, last, REPLAY_CHUNK)
        except StorageError as exc:
            # Its reply's header promised these events: better a clean
            # close (the client reconnects and asks again) than a short reply.
            log.error("%s: history reply cut short, closing: %s", client, exc)
            return self._drop(client, "hung_up")
        client.replay = [first, last] if first <= last else None
        if blob:
            client.queue.appendleft((hold, blob, True))
            client.reply_bytes += len(blob)

    def _flushed(self, client: Client) -> None:
        if client.writing:
            client.writing = False
            self._update_interest(client)
        if client.closing and not client.fin_sent and (
                client.stop_at is not None or client not in self._leaving):
            # All said: send FIN, but keep reading until the peer hangs up so
            # that our last frame is not destroyed by a reset.
            client.fin_sent = True
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close_now(client)

    def _set_reading(self, client: Client, reading: bool) -> None:
        client.reading = reading
        self._update_interest(client)

    def _update_interest(self, client: Client) -> None:
        events = (selectors.EVENT_READ if client.reading else 0) | (
            selectors.EVENT_WRITE if client.writing else 0)
        key = self.selector.get_map().get(client.fd)
        if not events:
            if key is not None:
                self.selector.unregister(client.sock)
        elif key is None:
            self.selector.register(client.sock, events, client)
        elif key.events != events:
            self.selector.modify(client.sock, events, client)

    def _check_backlog(self, client: Client) -> bool:
        """Evict a client whose unsent output is over the limit; False if so.

        Replies the client asked for do not count: a client that reads
        promptly is never evicted for output the server chose to send it."""
        end = self.stream.end if client.stop_at is None else client.stop_at
        backlog = client.backlog(end)
        if backlog <= self.limits.slow_reader_bytes:
            return True
        log.warning("%s: evicted as a slow reader (%d bytes unsent)", client, backlog)
        self.stats.evictions += 1
        self._leave(client, "slow_reader")
        self._close_now(client)
        return False

    # --- leaving and closing -------------------------------------------

    def _leave(self, client: Client, reason: str) -> None:
        """Take a member out of the room and tell the room why."""
        self.room.leave(client, reason)

    def _fail(self, client: Client, code: str, message: str, reason: str) -> None:
        """Tell the client what it did wrong, take it out, and close."""
        log.info("%s: %s (%s)", client, message, code)
        self._send_error(client, code, message)
        self._leave(client, reason)
        self._start_closing(client)

    def _drop(self, client: Client, reason: str) -> None:
        """The connection is gone or useless: close it now."""
        if client.closed:
            return
        self._leave(client, reason)
        self._close_now(client)

    def _start_closing(self, client: Client) -> None:
        client.closing = True
        client.close_deadline = self.now + CLOSE_GRACE
        self.deadlines.schedule(client, client.close_deadline)
        self.dirty.add(client)

    def _close_now(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.room.leave(client, "hung_up")  # a no-op unless still a member
        self.clients.pop(client.fd, None)
        self.streaming.discard(client)
        self.dirty.discard(client)
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
                self._on_deadline(client)
            except Exception:
                self._internal_error(client)
            if not client.closed:
                self.deadlines.schedule(client, self._next_deadline(client))
        if now >= self._next_tick:
            self._next_tick = now + TICK
            if self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                if not self.stopping:
                    self.selector.register(self.listener, selectors.EVENT_READ, _LISTENER)
            self.room.tick(now)
            self.admission.flush_log(now)
            self._prune()
            self.log.tick(now)

    def _next_deadline(self, client: Client) -> float:
        """The earliest time one of the client's timers can fire."""
        if client.closing:
            return client.close_deadline
        limits = self.limits
        when = client.last_recv + (limits.idle_timeout if client.pinged
                                   else limits.idle_timeout / 2)
        if client.name is None:
            when = min(when, client.connected_at + limits.hello_timeout)
        if client.partial_since:
            when = min(when, client.partial_since + limits.frame_timeout)
        if client.wake_at:
            when = min(when, client.wake_at)
        return when

    def _on_deadline(self, client: Client) -> None:
        """Fire whichever of the client's timers is due (at most one)."""
        now, limits = self.now, self.limits
        if client.closing:
            if now >= client.close_deadline:
                self._close_now(client)
        elif client.name is None and now >= client.connected_at + limits.hello_timeout:
            self._fail(client, "hello_timeout",
                       f"no hello within {limits.hello_timeout:g} s", "timed_out")
        elif client.partial_since and now >= client.partial_since + limits.frame_timeout:
            self._fail(client, "frame_timeout",
                       f"frame not finished within {limits.frame_timeout:g} s", "timed_out")
        elif now >= client.last_recv + limits.idle_timeout:
            self._fail(client, "idle_timeout",
                       f"silent for {limits.idle_timeout:g} s", "timed_out")
        elif not client.pinged and now >= client.last_recv + limits.idle_timeout / 2:
            client.pinged = True
            self.send(client, _IDLE_PING)
        if client.wake_at and now >= client.wake_at and not client.closing:
            client.wake_at = 0.0
            self._input_ready.add(client)  # its next token is due

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
        self.stream.append(frame)
        for client in list(self.clients.values()):
            if client.closing:
                continue
            if client in self.streaming:
                client.stop_at = self.stream.end
            else:
                self.send(client, frame)
            self._start_closing(client)
        self.room.forget_all()

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
        if not self._accept_paused_until:
            self.selector.unregister(self.listener)
        self.listener.close()
        self._commit()
        self._settle_log()
        frame = protocol.encode_frame({"type": "shutdown",
                                       "message": "the server is shutting down"},
                                      self.limits.max_frame)
        # Members get the notice after every room event accepted before it.
        self.stream.append(frame)
        self.stats.stream_events += 1
        for client in list(self.clients.values()):
            if client.closing:
                continue
            if client in self.streaming:
                client.stop_at = self.stream.end
            else:
                self.send(client, frame)
            client.closing = True
            client.close_deadline = self._shutdown_deadline
            self.deadlines.schedule(client, client.close_deadline)
            self.dirty.add(client)
        self.room.forget_all()


# Every silent member is pinged with the same frame: encode it once.
_IDLE_PING = protocol.encode_frame({"type": "ping", "token": "idle"})

# sendmsg() takes at most IOV_MAX buffers; the rest go in the next call.
_IOV_MAX = 1024


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name: create_server resolves it
