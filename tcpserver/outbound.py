"""What the server sends, and when: the shared room stream, each client's own
queue, history replies fed as the socket drains, and the slow-reader limit.

Room frames are appended once to one ``RoomStream`` (never once per member);
each member keeps only its offset into it.  A client's private frames
(welcome, errors, replies) wait in its own queue, each tagged with the room
offset at which it was queued, so they interleave with the room stream
exactly in the order the server produced them.

``flush_all`` runs once per loop turn: every client with pending bytes gets
them in one ``send``.  Room bytes that are only joins, leaves and member
counts may wait up to ``PRESENCE_LINGER`` for the next turns' ones, so that
a join storm costs each member a few sends, not one per join.  Only a
client whose kernel buffer is full registers ``EVENT_WRITE``, so an idle
server sleeps and a busy one makes no per-recipient selector calls.

``Outbound`` owns no connections: it is told how to drop one, how to report a
bug met while flushing one, and how to let a client's waiting requests go
on, as callables given to its constructor.
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import Callable

from tcpserver import protocol
from tcpserver.client_state import Client
from tcpserver.room import RoomStream
from tcpserver.roomlog import RoomLog, StorageError
from tcpserver.settings import Limits

log = logging.getLogger("tcpserver.server")

# A history reply is read from the log in pieces of about this size, as the
# client drains them: large enough for few reads, small enough that one
# client's replay pins little memory.
REPLAY_CHUNK = 256 * 1024
# Longest wait for the room log to deliver what it published (a leaver's own
# leave, or everything before the shutdown notice).
SETTLE_MAX = 1.0
# sendmsg() takes at most IOV_MAX buffers; the rest go in the next call.
_IOV_MAX = 1024
# How long room events that are only presence (joins, leaves, member counts)
# may wait to share their sends with the next ones, in seconds.  Below
# --announce-limit every join goes to every member: in a storm of N joins
# that was N sends (and N wake-ups, N WebSocket messages through the
# gateway) per member, most carrying one small frame.  Nobody notices a
# join shown 50 ms late; chat messages, private frames and replies never
# wait (anything else on the stream flushes all of it at once).
PRESENCE_LINGER = 0.05
# How a presence frame starts, after its 4-byte length: every encoder puts
# "type" first (``protocol.encode_frame``, the Redis scripts).  A frame that
# does not match is simply sent at once.
_PRESENCE_STARTS = (b'{"type":"join"', b'{"type":"leave"', b'{"type":"presence"')


def watch(selector: selectors.BaseSelector, client: Client) -> None:
    """Register exactly the events the client wants (``reading``,
    ``writing``) with the selector; none: unregister it."""
    events = (selectors.EVENT_READ if client.reading else 0) | (
        selectors.EVENT_WRITE if client.writing else 0)
    key = selector.get_map().get(client.fd)
    if not events:
        if key is not None:
            selector.unregister(client.sock)
    elif key is None:
        selector.register(client.sock, events, client)
    elif key.events != events:
        selector.modify(client.sock, events, client)


class Outbound:
    """The room stream and every client's pending output.

    Holds the output half of ``rules.Outbox`` (``send``, ``replay``,
    ``broadcast``, ``follow``, ``leaving``), which the server's Outbox
    methods call.  ``drop(client, reason)`` closes
    a connection at once (the member leaving for ``reason``);
    ``internal_error(client)`` reports a bug met while flushing it;
    ``input_ready(client)`` says its requests waiting behind a reply may go
    on.
    """

    def __init__(self, selector: selectors.BaseSelector, limits: Limits, roomlog: RoomLog, *,
                 drop: Callable[[Client, str], None],
                 internal_error: Callable[[Client], None],
                 input_ready: Callable[[Client], None]) -> None:
        self.selector = selector
        self.limits = limits
        self.log = roomlog
        self.stats = roomlog.stats
        self._drop = drop
        self._internal_error = internal_error
        self._input_ready = input_ready
        self.stream = RoomStream()
        self.streaming: set[Client] = set()  # clients reading the room stream
        self.dirty: set[Client] = set()  # clients with new private frames
        self._leaving: list[Client] = []  # stream them up to their own leave
        self._leaving_since = 0.0
        self._flushed_end = 0
        self._urgent = False  # room bytes past _flushed_end that must not wait
        self._linger_until = 0.0  # when unflushed presence must go anyway

    def flush_due(self) -> float | None:
        """When ``flush_all`` next has work, in monotonic seconds: 0.0 for at
        once (private frames, room events other than presence, evictions
        during a flush leaving some), the end of the presence linger, or
        None when nothing is pending."""
        if self.dirty or self._urgent:
            return 0.0
        if self.stream.end > self._flushed_end:
            return self._linger_until
        return None

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
        # A frame of the server's own (a member count, the shutdown notice)
        # starts no linger: time 0 puts its end in the past.  A count is
        # already paced (PRESENCE_INTERVAL) and, being presence, does not
        # hurry joins and leaves that linger.
        self.publish([frame], 0.0)

    def follow(self, client: Client) -> None:
        client.pos = self.stream.end
        self.streaming.add(client)

    def leaving(self, client: Client, now: float) -> None:
        if not self._leaving:
            self._leaving_since = now
        self._leaving.append(client)

    # --- the loop's turn -------------------------------------------------

    def publish(self, frames: list[bytes], now: float) -> None:
        """Put this turn's committed room events on the stream (``now`` in
        monotonic seconds starts the presence linger)."""
        if not frames:
            return
        if self.stream.end == self._flushed_end:
            self._linger_until = now + PRESENCE_LINGER
        for frame in frames:
            if not self._urgent and not frame.startswith(_PRESENCE_STARTS, 4):
                self._urgent = True
            self.stream.append(frame)
        self.stats.stream_events += len(frames)
        # Counted once per turn, not per recipient: every member streaming
        # now gets these (a member that follows later starts after them).
        self.stats.delivered += len(frames) * len(self.streaming)

    def end_leavers(self, now: float) -> None:
        """End the streams of the clients that left, at the room bytes so far.

        A log that publishes elsewhere (Redis) gives a leaver's own leave
        back later: its stream ends once that came (at most SETTLE_MAX)."""
        if self._leaving and (self.log.settled
                              or now >= self._leaving_since + SETTLE_MAX):
            for client in self._leaving:
                if client.stop_at is None:
                    client.stop_at = self.stream.end
                self.dirty.add(client)  # closing: its FIN can go now
            self._leaving.clear()

    def send_last(self, client: Client, frame: bytes) -> None:
        """Make ``frame``, just appended to the room stream, the client's
        last: a member's stream stops after it, anyone else gets it queued."""
        if client in self.streaming:
            client.stop_at = self.stream.end
        else:
            self.send(client, frame)

    def error_frame(self, code: str, message: str) -> bytes:
        """An encoded ``error`` frame; LocalProtocolError if it would not fit."""
        return protocol.encode_frame({"type": "error", "code": code, "message": message},
                                     self.limits.max_frame)

    def send_error(self, client: Client, code: str, message: str) -> None:
        self.send(client, self.error_frame(code, message))

    def forget(self, client: Client) -> None:
        """The connection closed: nothing more goes to it."""
        self.streaming.discard(client)
        self.dirty.discard(client)

    # --- flushing --------------------------------------------------------

    def flush_all(self, now: float) -> None:
        """Send pending bytes to every client that has some; room bytes that
        are only presence wait until ``now`` (monotonic seconds) reaches the
        end of their linger, except for clients with private frames."""
        stream_end = self.stream.end
        to_all = stream_end > self._flushed_end and (self._urgent
                                                     or now >= self._linger_until)
        if to_all:
            self._flushed_end = stream_end
            self._urgent = False
            targets = list(self.streaming)
            targets.extend(self.dirty.difference(self.streaming))
        else:
            targets = list(self.dirty)
        self.dirty.clear()
        # Most turns most members only have room bytes pending: they take a
        # lean path, each a slice of one view of the stream (the kernel's
        # send is most of the cost of a delivery; this keeps ours small).
        whole, base = self.stream.window()
        try:
            for client in targets:
                if client.closed:
                    continue
                try:
                    if client.writing:
                        # Blocked on a full kernel buffer: EVENT_WRITE will tell
                        # us.  Only check the backlog, so a stalled reader is evicted.
                        self._check_backlog(client)
                    elif client.queue or client.pos is None or client.closing \
                            or client.hold_at is not None or client.stop_at is not None:
                        self.flush(client)
                    else:
                        self._send_room(client, whole, base, stream_end)
                except Exception:
                    self._internal_error(client)
        finally:
            whole.release()
        if not (to_all and self.stream.buffered):
            # Only a turn that sent the stream to every member visits every
            # member to trim it: others (idle, presence lingering, replies
            # and pongs while a slow reader holds old bytes) stay O(clients
            # written to).  What a blocked member took meanwhile is trimmed
            # with the next event.
            return
        if self.streaming:
            self.stream.trim(min(c.pos for c in self.streaming))
        else:
            self.stream.trim(self.stream.end)

    def _send_room(self, client: Client, whole: memoryview, base: int, end: int) -> None:
        """``flush`` for a member with nothing but room bytes pending (no
        queue, replay, stop or close), which is most of them in a busy room.
        ``whole`` is the stream's ``window`` (starting at offset ``base``)."""
        pos = client.pos
        if pos >= end:
            return
        try:
            sent = client.sock.send(whole[pos - base : end - base])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.debug("%s: send failed: %s", client, exc)
            return self._drop(client, "hung_up")
        client.pos = pos + sent
        self.stats.bytes_out += sent
        if pos + sent < end and self._check_backlog(client):
            client.writing = True
            watch(self.selector, client)

    def flush(self, client: Client) -> None:
        """Send the client what it has pending, in one ``send``; what the
        kernel does not take waits for ``EVENT_WRITE``."""
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
            self._input_ready(client)  # requests waiting behind the reply
        if client.pending(end):
            if not self._check_backlog(client):
                return
            if not client.writing:
                client.writing = True
                watch(self.selector, client)
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
            self._input_ready(client)
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
        elif client.replay is None:
            # Retention dropped the rest meanwhile: nothing more will come
            # to send, so the room's events after the reply go now (held,
            # they would wait for some later event to flush them).
            client.hold_at = None
            self._input_ready(client)

    def _flushed(self, client: Client) -> None:
        if client.writing:
            client.writing = False
            watch(self.selector, client)
        if client.closing and not client.fin_sent and (
                client.stop_at is not None or client not in self._leaving):
            # All said: send FIN, but keep reading until the peer hangs up so
            # that our last frame is not destroyed by a reset.
            client.fin_sent = True
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(client, "hung_up")

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
        self._drop(client, "slow_reader")
        return False
