"""The room log in an SQLite file (stdlib ``sqlite3``), the default.

Layout: ``events(seq INTEGER PRIMARY KEY, ts INTEGER, frame BLOB)``, where
``seq`` is the rowid (so ``MAX(seq)`` and range reads walk the B-tree, never
the table), ``ts`` is the commit time in ms (for ``--retain-days``) and
``frame`` the encoded frame exactly as members were sent it; plus
``meta(key, value)`` holding the room's ``epoch``.

WAL mode with ``synchronous=NORMAL``: a commit survives a killed process
(the WAL is in the OS's cache at once); only a power loss may take the last
commits back.  One transaction per loop turn.

A second server on the same file is refused: ``PATH.lock`` holds an
``fcntl.flock`` for the server's lifetime and its PID, which the refusal
names.  The kernel drops the lock when the process dies, even by SIGKILL.

The lock file's second line, ``seen EPOCH SEQ``, is the highest ``seq``
members may have been sent, rewritten after every commit (one ``pwrite``,
no fsync).  A file that opens with the same epoch but fewer events than
that (a backup restored over it, or a power loss that took back commits
members saw) would hand out numbers members already hold for other
events, so it starts a new epoch instead and clients start a new
transcript.

Start-up reads the epoch, ``MIN``/``MAX(seq)`` and the newest ``recent``
frames: a handful of index reads, whatever the file's size.  Memory is
SQLite's page cache (``CACHE_KIB``) plus ``recent`` frames.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

from tcpserver.roomlog import RoomLog, StorageError, new_epoch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Retention deletes at most this many rows per step (a few ms), so pruning
# never stops the loop for long.
PRUNE_STEP = 1000
# SQLite's page cache, bounded so memory does not follow the file's size.
CACHE_KIB = 8 * 1024
# For tests only: a file holding a page count, applied as
# ``PRAGMA max_page_count`` at open and re-read on every prune tick, to
# simulate a full disk (README, "Storage faults").
TEST_MAX_PAGES_ENV = "CHATROOM_TEST_DB_MAX_PAGES_FILE"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, "
    "frame BLOB NOT NULL)",
    # Members announced in and not yet out: after a crash, their leaves.
    "CREATE TABLE IF NOT EXISTS present (label TEXT PRIMARY KEY) WITHOUT ROWID",
)
# MIN and MAX in one SELECT would scan the table; as two subqueries each
# is one B-tree descent.
_BOUNDS = "SELECT (SELECT MIN(seq) FROM events), (SELECT MAX(seq) FROM events)"
_TAIL = "SELECT seq, frame FROM events WHERE seq >= ? ORDER BY seq"
_INSERT = "INSERT INTO events (seq, ts, frame) VALUES (?, ?, ?)"
_RANGE = "SELECT frame FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq"
_JOINED = "INSERT OR IGNORE INTO present (label) VALUES (?)"
_LEFT = "DELETE FROM present WHERE label = ?"


class SqliteLog(RoomLog):
    """Room events in the SQLite file at ``path``.

    ``retain_events``: at most this many events are held (older ones are
    gone for history at once, and deleted by ``prune`` in steps);
    ``retain_days``: events older than this are deleted (0: no age limit).

    Raises StorageError (one line, naming the file) if the file cannot be
    opened, created, written or is not a database, or if another process
    holds it.
    """

    tracks_presence = True

    def __init__(self, path: str | os.PathLike, max_frame: int, recent: int,
                 retain_events: int, retain_days: float = 0.0) -> None:
        super().__init__(max_frame, recent)
        self.path = Path(path)
        self.retain_events = retain_events
        self.retain_days = retain_days
        self._degraded: str | None = None
        self._prune_failing = False
        self._lock_fd, self._seen_at, seen = _lock(self.path)
        try:
            self._db = self._open(seen)
            self._note_seen()
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StorageError(f"cannot use the room database {self.path}: {exc}") from None
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self, seen: tuple[str, int] | None) -> sqlite3.Connection:
        """Open (creating if need be) the database; ``seen`` is the (epoch,
        seq) the last server on this file may have sent members, if known."""
        # isolation_level=None: transactions are ours (BEGIN/COMMIT), one per turn.
        db = sqlite3.connect(self.path, isolation_level=None, cached_statements=16)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"written by a newer version (schema {version}, this one knows "
                    f"{SCHEMA_VERSION})")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.execute("BEGIN IMMEDIATE")  # also proves the file is writable
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            self.fresh = row is None
            self.epoch = new_epoch() if row is None else row[0]
            first, last = db.execute(_BOUNDS).fetchone()
            self._last_seq = last = last or 0
            if seen is not None and seen[0] == self.epoch and seen[1] > last:
                log.warning("room log: %s holds events up to seq %d, but members may have "
                            "seen up to %d (restored from a backup, or a power loss took "
                            "commits back): starting a new epoch, so clients start a new "
                            "transcript instead of taking new events for ones they hold",
                            self.path, last, seen[1])
                self.epoch = new_epoch()
            db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (self.epoch,))
            opened = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            db.execute("INSERT OR REPLACE INTO meta VALUES ('opened_by', ?)",
                       (f"pid {os.getpid()} at {opened}",))
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            self._db_first = first if first is not None else self._last_seq + 1
            start = max(self._db_first, self._last_seq - self._recent.maxlen + 1)
            self._recent.extend(db.execute(_TAIL, (start,)))
            # At most one row per member announced: bounded by the room, not the log.
            self._stranded = [label for (label,) in db.execute("SELECT label FROM present")]
            _apply_test_page_cap(db)
        except BaseException:
            db.close()
            raise
        return db

    # --- RoomLog ----------------------------------------------------------

    def _store(self, events: list[tuple[int, bytes]],
               presence: list[tuple[bool, str]]) -> None:
        now = int(time.time() * 1000)
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(_INSERT, [(seq, now, frame) for seq, frame in events])
            for joined, label in presence:
                db.execute(_JOINED if joined else _LEFT, (label,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._degraded = f"storage: {exc}"
            raise StorageError(self._degraded) from None
        if events:
            self._note_seen(events[-1][0])
        if self._degraded is not None:
            log.warning("room log: storing works again (%s)", self.path)
            self._degraded = None

    def _note_seen(self, seq: int | None = None) -> None:
        """Record in the lock file that members may be sent up to ``seq``
        (default: the last stored), before any of them is.  Fixed width, so
        each update is one ``pwrite`` over the last."""
        line = _seen_line(self.epoch, self._last_seq if seq is None else seq)
        try:
            os.pwrite(self._lock_fd, line, self._seen_at)
        except OSError as exc:
            # Only the restore check loses by it; the room goes on.
            log.debug("room log: cannot record the last seq in the lock file: %s", exc)

    def _load(self, first: int, last: int, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        try:
            cursor = self._db.execute(_RANGE, (first, last))
            # The cursor steps through the B-tree lazily: stopping early
            # reads no more rows than are returned.
            for (frame,) in cursor:
                if out and size + len(frame) > max_bytes:
                    break
                out.append(frame)
                size += len(frame)
            cursor.close()
        except sqlite3.Error as exc:
            # Raised, not an empty list: a reply whose header promised
            # these events must not silently fall short (the server drops
            # that one client, which can ask again).
            raise StorageError(f"cannot read events {first}..{last}: {exc}") from None
        return out

    def stranded(self) -> list[str]:
        return self._stranded

    def forget_members(self) -> None:
        try:
            self._db.execute("DELETE FROM present")
        except sqlite3.Error as exc:
            log.warning("room log: could not record the shutdown: %s", exc)

    def _first_seq(self) -> int:
        # Events past --retain-events are gone for readers at once; prune
        # deletes them from the file later, in steps.
        return max(self._db_first, self._last_seq - self.retain_events + 1)

    def prune(self) -> int:
        """Delete at most PRUNE_STEP of the oldest events past retention, in
        one transaction; return how many.  Oldest first, so the held seqs
        stay contiguous.  While storing fails, also checks (with a write
        rolled back) whether it works again, so ``degraded`` clears without
        waiting for a message."""
        _apply_test_page_cap(self._db)
        if self._degraded is not None:
            self._probe()
        stop = min(self._first_seq(), self._db_first + PRUNE_STEP)  # delete seq < stop
        try:
            if self.retain_days > 0:
                cutoff = int((time.time() - self.retain_days * 86400) * 1000)
                young = self._db.execute(
                    "SELECT MIN(seq) FROM events WHERE seq >= ? AND seq < ? AND ts >= ?",
                    (self._db_first, self._db_first + PRUNE_STEP, cutoff)).fetchone()[0]
                # The newest event always stays: MAX(seq) is where seq
                # continues after a restart, whatever its age.
                stop = max(stop, min(self._db_first + PRUNE_STEP,
                                     young if young is not None else self._last_seq))
            if stop <= self._db_first:
                return 0
            self._db.execute("DELETE FROM events WHERE seq < ?", (stop,))
        except sqlite3.Error as exc:
            self._rollback()
            if not self._prune_failing:  # once, not every tick
                log.warning("room log: pruning failed: %s", exc)
            self._prune_failing = True
            return 0
        self._prune_failing = False
        removed = stop - self._db_first
        self._db_first = stop
        return removed

    def _probe(self) -> None:
        """While degraded: does a page-sized write fit again?  Rolled back."""
        try:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)",
                             ("x" * 8192,))
        except sqlite3.Error:
            self._rollback()
            return
        self._rollback()
        log.warning("room log: storing works again (%s)", self.path)
        self._degraded = None

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback failed: %s", exc)

    @property
    def degraded(self) -> str | None:
        return self._degraded

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)

    def describe(self) -> str:
        days = "" if self.retain_days <= 0 else (
            f", for {self.retain_days:g} day{'' if self.retain_days == 1 else 's'}")
        fresh = "new database, a new epoch; " if self.fresh else ""
        return f"sqlite {self.path} ({fresh}keeps {self.retain_events} events{days})"


def _lock(path: Path) -> tuple[int, int, tuple[str, int] | None]:
    """Create the file's directory, take ``PATH.lock`` and write our PID in
    it, keeping the ``seen`` line after it; return its descriptor, that
    line's offset, and the (epoch, seq) its last holder recorded as seen,
    if any.  Raises StorageError naming the holder."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Beside the file itself: a symlink to a database in use must not
        # dodge its lock.
        real = path.resolve()
        lock_path = real.with_name(real.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:  # mkdir met a file where a directory should be
        raise StorageError(f"cannot use the room database {path}: {exc.filename} "
                           "is not a directory") from None
    except OSError as exc:
        raise StorageError(f"cannot use the room database {path}: "
                           f"{exc.strerror or exc} ({exc.filename or lock_path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").partition("\n")[0].strip()
        os.close(fd)
        raise StorageError(f"the room database {path} is in use by another chat server "
                           f"(pid {holder or 'unknown'}, see {lock_path}); stop it or choose "
                           "another file with --db") from None
    seen = _parse_seen(os.pread(fd, 256, 0).decode(errors="replace"))
    pid_line = f"{os.getpid()}\n".encode()
    # The seen line is carried over at once: a crash before our first
    # commit must not lose it.
    kept = b"" if seen is None else _seen_line(*seen)
    os.ftruncate(fd, 0)
    os.pwrite(fd, pid_line + kept, 0)
    return fd, len(pid_line), seen


def _seen_line(epoch: str, seq: int) -> bytes:
    # Fixed width: each update overwrites the last exactly.
    return f"seen {epoch} {seq:020d}\n".encode()


def _parse_seen(text: str) -> tuple[str, int] | None:
    """The ``seen EPOCH SEQ`` line of a lock file's text; None if absent or
    unreadable (an older server's file, a torn write)."""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "seen" and words[2].isdigit():
            return words[1], int(words[2])
    return None


def _apply_test_page_cap(db: sqlite3.Connection) -> None:
    name = os.environ.get(TEST_MAX_PAGES_ENV)
    if not name:
        return
    try:
        pages = int(Path(name).read_text().strip())
    except (OSError, ValueError):
        return
    db.execute(f"PRAGMA max_page_count={pages}")
