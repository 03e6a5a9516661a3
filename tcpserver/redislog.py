"""The room log in Redis (``--redis``): one room shared by several servers.

Keys, all under ``chatroom:{ROOM}:`` (the braces are a Redis Cluster hash
tag: every key of a room lives on one shard, so scripts may touch them all):

* ``epoch``  -- string, the transcript's name; ``SET NX`` by the first node.
* ``seq``    -- integer, the last seq issued (``INCR``).
* ``stream`` -- stream of room events, entry ID ``0-<seq>``, one field
  ``f`` holding the event's JSON payload (each node frames it with
  ``protocol.frame_payload``), trimmed with ``MAXLEN ~ retain``.

Publishing: ``stage`` encodes an event with a sentinel seq and splits the
payload around it; ``commit`` sends the turn's events in one ``EVALSHA`` of
``PUBLISH``, which checks the epoch, ``INCR``s the seq, splices it in and
``XADD``s each event -- atomically, so seqs are consecutive, stream IDs
equal seqs, and every node sees one total order.  The stream holds
payloads, not frames: the length header is built by our one codec
(``protocol.frame_payload``), identically on every node, not in Lua.

Delivery: a second connection loops on ``XREAD BLOCK`` from the last entry
read; the next ``commit`` appends the entries read, byte for byte, to the
in-memory mirror (the last ``recent`` events, loaded with ``XREVRANGE`` at
start) and returns them for the room stream.  Until then ``last_seq`` and
the mirror leave them out: a welcome or a history reply written in between
ends before them, and the member gets them once, on the stream.  A
member's own message therefore reaches it through Redis, in the same order
as everyone else's.  History is served from the mirror
(``--history-replay`` deep): older ``before`` pages are not fetched from
the stream.

Failures: a publish that fails (Redis down, an error) is handed back through
``take_failed`` and its sender is told ``room_unavailable``; ``degraded``
says why.  After a reconnect, reading resumes from the last delivered entry,
so nothing is skipped.  If the epoch key is gone (Redis lost its data), the
node adopts a new epoch (``SET NX``: all nodes agree) and ``take_reset``
tells the server to close every member with a ``shutdown`` notice: they
reconnect and see the new epoch in their welcome.
"""

from __future__ import annotations

import hashlib
import logging
import select
import selectors
import time
from typing import Any, Callable

from tcpserver import protocol, resp
from tcpserver.redisscripts import ADOPT, PUBLISH
from tcpserver.roomlog import RoomLog, new_epoch
from tcpserver.settings import ROOM_NAME

log = logging.getLogger(__name__)

# Events kept in the stream (MAXLEN ~): like the SQLite log's default.
DEFAULT_RETAIN = 1_000_000
# XREAD waits this long (ms) before answering "nothing"; a reply overdue
# by REPLY_SLACK seconds more means the connection is dead.
BLOCK_MS = 2000
REPLY_SLACK = 5.0
# How long a turn that published waits for its events to come back before
# flushing (a loopback round trip is ~0.1 ms; a LAN one well under 1 ms).
TURN_WAIT = 0.002
# Entries taken per XREAD: bounds one reply's size.
READ_COUNT = 1000
# A number no room reaches: the payload is split around it.
_SENTINEL = 10**15
_SEQ_MARK = b'"seq":%d' % _SENTINEL


class Script:
    """A Lua script run by ``EVALSHA``, falling back to ``EVAL`` (which
    also caches it) when Redis answers NOSCRIPT, e.g. after a restart."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, conn: resp.RedisConnection, keys: list[str], args: list[Any],
            callback: Callable[[Any], None]) -> None:
        def reply(value: Any) -> None:
            if isinstance(value, resp.ReplyError) and str(value).startswith("NOSCRIPT"):
                conn.command("EVAL", self.source, len(keys), *keys, *args, callback=callback)
            else:
                callback(value)

        conn.command("EVALSHA", self.sha, len(keys), *keys, *args, callback=reply)


class RedisLog(RoomLog):
    """Room events in a Redis stream shared by every node of the room.

    Raises OSError at construction if Redis cannot be reached (start-up
    blocks on it: a node without its room has nothing to serve)."""

    def __init__(self, url: str, room: str, max_frame: int, recent: int,
                 retain: int = DEFAULT_RETAIN) -> None:
        super().__init__(max_frame, recent)
        if not ROOM_NAME.fullmatch(room):
            raise ValueError(f"the room name {room!r} is not 1-64 letters, digits, "
                             "'-', '_' or '.'")
        self.address = resp.RedisAddress(url)
        self.room = room
        self.prefix = f"chatroom:{{{room}}}:"
        self.retain = retain
        self._publish = Script(PUBLISH)
        self._adopt_script = Script(ADOPT)
        # Loaded on every new connection before anything else is sent, so
        # EVALSHA meets NOSCRIPT only after a SCRIPT FLUSH.
        self.scripts = [self._publish, self._adopt_script]
        # (seq, frame) read from the stream, not yet handed out by commit.
        self._delivered: list[tuple[int, bytes]] = []
        self._read_seq = 0  # the last entry read from the stream
        self._failed: list[object] = []
        self._reset = False
        self._epoch_lost = False
        self._write_error: str | None = None
        self._stream_first: int | None = None  # the stream's oldest seq, if known
        self._next_oldest = 0.0
        self._publishing = 0  # EVALSHAs of PUBLISH awaiting their reply
        self._published_upto = 0  # the highest seq this node published
        # Another stream read by the same XREAD (a node's private inbox):
        # key -> (last ID, handler of each entry's field list).
        self.extra_streams: dict[str, list] = {}
        # The presence's hooks: on each (re)connect, on the tick, at close.
        self.up_hooks: list[Callable[[], None]] = []
        self.tick_hooks: list[Callable[[float], None]] = []
        self.close_hooks: list[Callable[[], None]] = []
        self.flush_hooks: list[Callable[[], None]] = []  # last commands of a turn
        self.stats.redis = True
        self.cmd: resp.RedisConnection | None = None
        self.reader: resp.RedisConnection | None = None
        self._start()

    def key(self, name: str) -> str:
        return self.prefix + name

    # --- start-up ----------------------------------------------------------

    def _start(self) -> None:
        epoch_key, stream = self.key("epoch"), self.key("stream")
        _, epoch, newest, oldest = resp.call(
            self.address, ("SET", epoch_key, new_epoch(), "NX"), ("GET", epoch_key),
            ("XREVRANGE", stream, "+", "-", "COUNT", self._recent.maxlen),
            ("XRANGE", stream, "-", "+", "COUNT", 1))
        if isinstance(newest, Exception) or isinstance(epoch, Exception):
            raise OSError(f"Redis refused the room's keys: {newest}")
        self.epoch = epoch.decode()
        entries = []
        for entry_id, fields in newest:  # newest first; keep the consecutive run
            seq = _seq_of(entry_id)
            if entries and seq != entries[-1][0] - 1:
                break
            entries.append((seq, _frame(fields[1])))
        self._recent.extend(reversed(entries))
        self._last_seq = self._read_seq = entries[0][0] if entries else 0
        self._set_oldest(oldest)

    def _set_oldest(self, reply: Any) -> None:
        if isinstance(reply, list) and reply:
            self._stream_first = _seq_of(reply[0][0])

    @property
    def oldest_seq(self) -> int:
        """The stream's oldest entry (refreshed every second): ``history
        before`` reaches back to it through ``fetch``."""
        first = self.first_seq
        return first if self._stream_first is None else min(first, self._stream_first)

    def fetch(self, first: int, last: int, done) -> None:
        def reply(entries: Any) -> None:
            if isinstance(entries, Exception):
                log.warning("room log: history %d..%d not read: %s", first, last, entries)
                return done(None)
            done([(_seq_of(entry_id), _frame(fields[1])) for entry_id, fields in entries])

        self.cmd.command("XRANGE", self.key("stream"), f"0-{first}", f"0-{last}",
                         callback=reply)

    def make_presence(self):
        from tcpserver.redispresence import RedisPresence

        return RedisPresence(self)

    def attach(self, selector: selectors.BaseSelector) -> None:
        """Open the two connections in the server's selector."""
        self.cmd = resp.RedisConnection(self.address, selector, "commands",
                                        on_up=self._cmd_up, on_down=self._down)
        self.reader = resp.RedisConnection(self.address, selector, "stream reader",
                                           on_up=self._read_next, on_down=self._down)
        self.tick(0.0)

    def _cmd_up(self) -> None:
        for script in self.scripts:
            self.cmd.command("SCRIPT", "LOAD", script.source)
        self.cmd.command("MGET", self.key("epoch"), self.key("seq"), callback=self._check_epoch)

    def _run_up_hooks(self) -> None:
        for hook in self.up_hooks:
            hook()

    @property
    def resetting(self) -> bool:
        """A new epoch began and the server has not closed its members yet."""
        return self._reset

    def _down(self, reason: str) -> None:
        log.warning("room log: Redis unreachable (%s); messages are refused until it is back",
                    reason)

    def _check_epoch(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            return  # the connection broke again; the next one checks
        epoch, seq = reply
        # A seq behind what we delivered: Redis came back with old data
        # (e.g. a lost AOF tail), so its numbers would be given twice.
        if epoch is None or epoch.decode() != self.epoch or int(seq or 0) < self._read_seq:
            self._lose_epoch()
        else:
            self._run_up_hooks()

    def _lose_epoch(self) -> None:
        """Redis no longer holds our transcript: adopt the room's new epoch."""
        if self._epoch_lost:
            return
        self._epoch_lost = True
        log.error("room log: epoch %s is gone from Redis (its data was lost); "
                  "starting a new transcript", self.epoch)
        self._adopt_script.run(self.cmd, [self.key(k) for k in
                                          ("epoch", "seq", "stream", "names", "index")],
                               [self.epoch, new_epoch()], self._adopt)

    def _adopt(self, epoch: Any) -> None:
        self._epoch_lost = False
        if isinstance(epoch, Exception) or epoch is None:
            return  # the next reconnect checks again
        self.epoch = epoch.decode()
        self._recent.clear()
        self._tail_cache = None
        self._chunks.clear()
        self._last_seq = self._read_seq = 0
        self._published_upto = 0
        self._stream_first = None
        self._delivered.clear()
        self._reset = True
        log.info("room log: new epoch %s", self.epoch)
        # The blocking read in flight names an ID of the old transcript:
        # restart it from the beginning of the new one.
        if self.reader.up:
            self.reader.reconnect_now("new epoch")
        self._run_up_hooks()

    # --- writing ---------------------------------------------------------------

    def stage(self, event: dict[str, Any], owner: object = None) -> bytes:
        """Encode ``event``; Redis gives it its seq at ``commit``.  Returns
        the frame as encoded with a placeholder seq (for its size)."""
        event["seq"] = _SENTINEL
        payload = protocol.encode_payload(event)
        frame = protocol.frame_payload(payload, self.max_frame)  # raises if too big
        # '"seq":' outside a string is the key itself: inside one, the
        # quotes would be escaped.
        at = payload.index(_SEQ_MARK) + len(_SEQ_MARK) - len(str(_SENTINEL))
        self._staged.append((payload[:at], payload[at + len(str(_SENTINEL)):], owner))
        del event["seq"]
        return frame

    def commit(self) -> list[bytes]:
        """Send the turn's events (one EVALSHA, written at ``flush``); return
        the frames delivered from the stream since the last call."""
        staged, self._staged = self._staged, []
        if staged:
            owners = [owner for _, _, owner in staged]
            args: list[Any] = [self.epoch, self.retain]
            for prefix, suffix, _ in staged:
                args += [prefix, suffix]

            sent = time.monotonic()

            self._publishing += 1

            def published(reply: Any) -> None:
                self._publishing -= 1
                self.stats.redis_round_trip(time.monotonic() - sent)
                self.note_write(reply)
                if not isinstance(reply, Exception):
                    self.stats.published += len(owners)
                    self._published_upto = max(self._published_upto, reply)
                else:
                    if str(reply).startswith("EPOCH"):
                        self._lose_epoch()
                    log.debug("room log: %d events not published: %s", len(owners), reply)
                    self._failed.extend(owners)

            self._publish.run(self.cmd, [self.key("epoch"), self.key("seq"),
                                         self.key("stream")], args, published)
            self.flush()
            self._await_delivery()
        delivered, self._delivered = self._delivered, []
        for seq, frame in delivered:
            if seq != self._last_seq + 1:
                self._recent.clear()  # a gap (logged when read): restart the mirror
            self._recent.append((seq, frame))
            self._last_seq = seq
        return [frame for _, frame in delivered]

    def _await_delivery(self) -> None:
        """Wait a moment (at most TURN_WAIT) for this turn's events to come
        back from the stream, serving only the two Redis sockets, so they go
        out in this turn's flush.  Without it a round (say, echo, next say)
        takes two loop turns instead of one, and a busy server pays its
        per-turn cost (a send to every member) twice per event batch.  A slow
        or absent Redis costs each publishing turn TURN_WAIT at most; the
        loop never waits longer."""
        deadline = time.monotonic() + TURN_WAIT
        while not self.settled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller = select.poll()
            conns = {conn.sock.fileno(): conn for conn in (self.cmd, self.reader)
                     if conn.sock is not None}
            for fd in conns:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(remaining * 1000):
                conns[fd].on_ready(selectors.EVENT_READ)
            self.reader.flush()  # the next XREAD
            self.cmd.flush()

    def note_write(self, reply: Any) -> None:
        """Record how a write went (a publish, the heartbeat): Redis may be
        up yet refuse writes (OOM at maxmemory, a read-only replica, a
        failed disk with MISCONF).  One error line per episode."""
        if isinstance(reply, resp.ReplyError) and not str(reply).startswith("EPOCH"):
            if self._write_error is None:
                log.error("room log: Redis refuses writes: %s; messages are refused until "
                          "it accepts them", reply)
            self._write_error = str(reply)
        elif not isinstance(reply, Exception) and self._write_error is not None:
            log.info("room log: Redis accepts writes again")
            self._write_error = None

    def take_failed(self) -> list[object]:
        failed, self._failed = self._failed, []
        return failed

    def take_reset(self) -> bool:
        reset, self._reset = self._reset, False
        return reset

    # --- reading the stream -------------------------------------------------------

    def _read_next(self) -> None:
        streams = [self.key("stream"), *self.extra_streams]
        ids = [f"0-{self._read_seq}", *(v[0] for v in self.extra_streams.values())]
        self.reader.command("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS",
                            *streams, *ids, callback=self._on_read,
                            timeout=BLOCK_MS / 1000 + REPLY_SLACK)

    def _on_read(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            if not isinstance(reply, ConnectionError):
                log.error("room log: XREAD failed: %s", reply)
                self.reader.reconnect_now(str(reply))
            return
        for name, entries in reply or ():
            name = name.decode()
            if name == self.key("stream"):
                self._deliver(entries)
                # A full reply means more entries wait in the stream.
                self.stats.stream_lag_events = READ_COUNT if len(entries) == READ_COUNT else 0
            elif name in self.extra_streams:
                state = self.extra_streams[name]
                for entry_id, fields in entries:
                    state[0] = entry_id.decode()
                    state[1](fields)
        self._read_next()

    def _deliver(self, entries: list) -> None:
        for entry_id, fields in entries:
            seq = _seq_of(entry_id)
            if seq <= self._read_seq:
                continue
            if seq != self._read_seq + 1:
                # Trimmed away before we read it (a very slow node): the
                # mirror must stay consecutive, so commit restarts it here.
                log.warning("room log: events %d..%d were trimmed before this node read them",
                            self._read_seq + 1, seq - 1)
            if self._stream_first is None:
                self._stream_first = seq  # the stream was empty when we looked
            self._delivered.append((seq, _frame(fields[1])))
            self._read_seq = seq
        if entries:
            # The newest event's age as it is delivered: one look per read.
            payload = entries[-1][1][1]
            at = payload.rfind(b'"ts":')
            if at >= 0:
                digits = payload[at + 5:at + 25].split(b",", 1)[0].split(b"}", 1)[0]
                if digits.isdigit():
                    self.stats.stream_lag_seconds = max(0, time.time() * 1000 - int(digits)) / 1000

    # --- the loop's hooks ------------------------------------------------------------

    @property
    def timed(self) -> bool:
        return True

    @property
    def settled(self) -> bool:
        if not (self.cmd.up and self.reader.up):
            return True  # nothing more will come back: do not wait
        return self._publishing == 0 and self._read_seq >= self._published_upto

    def flush(self) -> None:
        for hook in self.flush_hooks:
            hook()
        self.cmd.flush()
        self.reader.flush()

    def tick(self, now: float) -> None:
        self.cmd.tick(now)
        self.reader.tick(now)
        if self.cmd.up and now >= self._next_oldest:
            self._next_oldest = now + 1.0  # MAXLEN ~ trims the stream's front
            self.cmd.command("XRANGE", self.key("stream"), "-", "+", "COUNT", 1,
                             callback=self._set_oldest)
        for hook in self.tick_hooks:
            hook(now)

    @property
    def degraded(self) -> str | None:
        for conn in (self.cmd, self.reader):
            if conn is not None and not conn.up:
                return f"redis: {conn.reason}"
        return None if self._write_error is None else f"redis: {self._write_error}"

    def close(self) -> None:
        for hook in self.close_hooks:
            hook()
        for conn in (self.cmd, self.reader):
            if conn is not None:
                conn.close()

    def describe(self) -> str:
        return f"Redis {self.address}, room {self.room!r} (keys {self.prefix}*)"

    # --- RoomLog's storage hooks: everything held is in the mirror --------------------

    def _store(self, events: list[tuple[int, bytes]],
               presence: list[tuple[bool, str]]) -> None:
        raise NotImplementedError  # commit() is overridden

    def _load(self, first: int, last: int, max_bytes: int) -> list[bytes]:
        return []

    def _first_seq(self) -> int:
        return self._recent[0][0] if self._recent else self._last_seq + 1


def _frame(payload: bytes) -> bytes:
    # Another node may allow larger frames (--max-frame): never refuse one here.
    return protocol.frame_payload(payload, len(payload))


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[1])
