"""The room log: every room event (``message``, ``join``, ``leave``) in
``seq`` order, behind one small interface.

The room's rules ``stage`` events as they happen; the server ``commit``s
once per loop turn, before it sends anything, and appends the frames that
``commit`` returns to the room stream.  So a member never receives an
event that the log does not hold, and the cost is one commit per turn.

Sequence numbers are consecutive: a failed commit takes its staged events
back, so numbers are never skipped and ``first_seq..last_seq`` is exactly
what the log holds.  Implementations: ``MemoryLog`` here (``--db
:memory:``) and ``SqliteLog`` in ``tcpserver.sqlitelog``.
"""

from __future__ import annotations

import abc
import secrets
from collections import deque
from typing import Any

from tcpserver import protocol
from tcpserver.metrics import ServerStats

# Replay pieces kept for reuse: a reconnect storm asks for a few ranges.
_CHUNK_CACHE = 16


class StorageError(Exception):
    """The log cannot store events right now (disk full, I/O error).

    The staged events were dropped; the log keeps working once the cause is
    gone.  ``str()`` is one line for the operator.
    """


def new_epoch() -> str:
    """A fresh epoch: 16 hex digits naming one transcript."""
    return secrets.token_hex(8)


class RoomLog(abc.ABC):
    """Where room events are kept.

    ``recent`` (at least the server's ``--history``) frames are also kept in
    memory, so welcomes and reconnects do not touch storage.
    """

    # Whether ``_store`` keeps who is in the room (for ``stranded``).
    tracks_presence = False

    def __init__(self, max_frame: int, recent: int) -> None:
        self.max_frame = max_frame
        self.epoch = ""  # set by the implementation
        # The server's counters (--metrics-port); ChatServer.stats is this
        # object, so a log can count what only it sees (events stored, Redis
        # round trips, stream lag).
        self.stats = ServerStats()
        self._last_seq = 0  # committed
        self._staged: list[tuple[int, bytes]] = []
        # (joined?, label) of the staged join and leave events, in order.
        self._presence: list[tuple[bool, str]] = []
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=max(recent, 1))
        self._tail_cache: tuple[tuple[int, int], bytes] | None = None
        # Committed frames never change, so cached pieces never go stale.
        self._chunks: dict[tuple[int, int, int], tuple[int, bytes]] = {}

    # --- writing --------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The newest committed event's seq, 0 for an empty room."""
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """The oldest seq still held; ``last_seq + 1`` when none is."""
        return self._first_seq()

    def stage(self, event: dict[str, Any], owner: object = None) -> bytes:
        """Give ``event`` the next seq (its ``"seq"`` field is set) and
        encode it; it is stored by the next ``commit``.  Returns the frame.
        ``owner`` (its sender) comes back from ``take_failed`` if a log that
        stores asynchronously fails to store it after ``commit`` returned.

        Raises protocol.LocalProtocolError if it does not fit in a frame.
        """
        event["seq"] = self._last_seq + len(self._staged) + 1
        frame = protocol.encode_frame(event, self.max_frame)
        self._staged.append((event["seq"], frame))
        if self.tracks_presence and event["type"] in ("join", "leave"):
            self._presence.append((event["type"] == "join", event["member"]))
        return frame

    @property
    def staged(self) -> int:
        """How many events wait for ``commit``."""
        return len(self._staged)

    def commit(self) -> list[bytes]:
        """Store the staged events in one transaction; return their frames,
        in seq order, for delivery.  Raises StorageError, after which the
        staged events are gone and their numbers will be given again."""
        staged, self._staged = self._staged, []
        presence, self._presence = self._presence, []
        if not staged:
            if presence:
                self._store([], presence)
            return []
        self._store(staged, presence)
        self.stats.published += len(staged)
        self._recent.extend(staged)
        self._last_seq = staged[-1][0]
        return [frame for _, frame in staged]

    # --- reading --------------------------------------------------------

    def frames(self, first: int, last: int, max_bytes: int) -> list[bytes]:
        """Committed frames with ``first <= seq <= last``, oldest first,
        stopping before ``max_bytes`` is passed (but never empty if the
        range is not).  The caller keeps ``first..last`` inside
        ``first_seq..last_seq``.  Raises StorageError if storage cannot be
        read."""
        if first > last:
            return []
        recent = self._recent
        if recent and first >= recent[0][0]:
            start = first - recent[0][0]
            out, size = [], 0
            for i in range(start, start + last - first + 1):
                frame = recent[i][1]
                if out and size + len(frame) > max_bytes:
                    break
                out.append(frame)
                size += len(frame)
            return out
        return self._load(first, last, max_bytes)

    def chunk(self, first: int, last: int, max_bytes: int) -> tuple[int, bytes]:
        """One piece of a replay of ``first..last``: (the seq to continue
        from, the frames joined).  Events pruned meanwhile are skipped.
        Recent pieces are cached, so a reconnect storm asking for the same
        range shares one bytes object instead of making one per client."""
        first = max(first, self.first_seq)
        key = (first, last, max_bytes)
        cached = self._chunks.get(key)
        if cached is None:
            frames = self.frames(first, last, max_bytes)
            cached = (first + len(frames) if frames else last + 1, b"".join(frames))
            if len(self._chunks) >= _CHUNK_CACHE:
                self._chunks.pop(next(iter(self._chunks)))  # the oldest entry
            self._chunks[key] = cached
        return cached

    def tail(self, count: int) -> tuple[int, bytes]:
        """The last ``count`` committed events (fewer if the log holds
        fewer, at most what is kept in memory) as (how many, one bytes
        object of their frames).  The object is shared by every caller until
        the next commit, so a burst of joins costs one join of bytes."""
        count = min(count, len(self._recent), self._last_seq - self.first_seq + 1)
        key = (self._last_seq, count)
        if self._tail_cache is None or self._tail_cache[0] != key:
            recent = self._recent
            blob = b"".join(recent[i][1] for i in range(len(recent) - count, len(recent)))
            self._tail_cache = (key, blob)
        return count, self._tail_cache[1]

    # --- for implementations -------------------------------------------

    @abc.abstractmethod
    def _store(self, events: list[tuple[int, bytes]],
               presence: list[tuple[bool, str]]) -> None:
        """Write (seq, frame) pairs durably, and who the announced joins and
        leaves among them leave in the room; raise StorageError."""

    def note_left(self, label: str) -> None:
        """A member left unannounced (a large room): stored with the turn."""
        if self.tracks_presence:
            self._presence.append((False, label))

    def stranded(self) -> list[str]:
        """Labels of members whose join was stored but whose leave never
        was: the server stopped without a word (a crash, kill -9)."""
        return []

    def forget_members(self) -> None:
        """An orderly shutdown announced everyone's departure at once."""

    @abc.abstractmethod
    def _load(self, first: int, last: int, max_bytes: int) -> list[bytes]:
        """Frames from storage, as ``frames`` describes."""

    @abc.abstractmethod
    def _first_seq(self) -> int:
        """Oldest seq held, ``last_seq + 1`` if none."""

    def prune(self) -> int:
        """One small step of retention; return how many events it removed."""
        return 0

    @property
    def degraded(self) -> str | None:
        """Why the log cannot store events right now, or None."""
        return None

    def close(self) -> None:
        """Release the storage."""

    # --- for a log that stores asynchronously (Redis) ---------------------

    def take_failed(self) -> list[object]:
        """Owners of events that failed to be stored after ``commit``
        returned (each is told ``room_unavailable``); cleared by the call."""
        return []

    def take_reset(self) -> bool:
        """True once after the log switched to a new epoch on its own (its
        storage lost the transcript): every member must reconnect."""
        return False

    @property
    def oldest_seq(self) -> int:
        """The oldest seq the room still holds anywhere (at least as old as
        ``first_seq``; older ones come through ``fetch``)."""
        return self.first_seq

    def fetch(self, first: int, last: int, done) -> None:
        """Read ``first..last`` from storage that may answer later:
        ``done([(seq, frame), ...])`` oldest first (events trimmed meanwhile
        left out), or ``done(None)`` if storage cannot answer now."""
        done([(first + i, f) for i, f in enumerate(self.frames(first, last, 1 << 62))])

    def make_presence(self):
        """The ``presence.Presence`` for a room shared with other processes
        through this log's storage; None for a room in one process."""
        return None

    def attach(self, selector) -> None:
        """Register the log's sockets in the server's selector."""

    def flush(self) -> None:
        """Write what this loop turn queued for storage (once per turn)."""

    def tick(self, now: float) -> None:
        """Timers (reconnects, heartbeats), on the server's tick."""

    @property
    def settled(self) -> bool:
        """True when every event committed has come back from ``commit``
        (always, for a log that stores synchronously)."""
        return True

    @property
    def timed(self) -> bool:
        """True if ``tick`` must run even when no client is connected."""
        return False

    def describe(self) -> str:
        """Where the log lives, for the start-up log line."""
        return type(self).__name__


class MemoryLog(RoomLog):
    """Events in memory only (``--db :memory:``): a new epoch every start,
    and at most ``retain`` events kept for history."""

    def __init__(self, max_frame: int, recent: int, retain: int) -> None:
        super().__init__(max_frame, max(recent, retain))
        self.epoch = new_epoch()

    def _store(self, events: list[tuple[int, bytes]],
               presence: list[tuple[bool, str]]) -> None:
        pass  # the in-memory ring filled by commit is the storage

    def _load(self, first: int, last: int, max_bytes: int) -> list[bytes]:
        return []  # everything held is in the ring, which frames() reads

    def _first_seq(self) -> int:
        return self._recent[0][0] if self._recent else self._last_seq + 1

    def describe(self) -> str:
        return "memory (nothing is kept across restarts)"
