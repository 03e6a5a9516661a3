"""SqliteLog on real files, in process: persistence, retention, faults."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tcpserver import protocol, sqlitelog
from tcpserver.roomlog import StorageError
from tcpserver.sqlitelog import PRUNE_STEP, SqliteLog


def open_log(path, recent=10, retain=1_000_000, days=0.0) -> SqliteLog:
    return SqliteLog(path, protocol.MAX_FRAME_SIZE, recent, retain, days)


def add(roomlog: SqliteLog, count: int, text: str = "m") -> list[bytes]:
    for i in range(count):
        roomlog.stage({"type": "message", "from": "a@127.0.0.1", "text": f"{text}{i}", "ts": 1})
    return roomlog.commit()


def seqs(frames: list[bytes]) -> list[int]:
    return [protocol.parse_server_message(frame[4:])["seq"] for frame in frames]


def rows(path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM events ORDER BY seq")]


def test_epoch_and_seq_survive_reopening(tmp_path):
    path = tmp_path / "deep" / "dir" / "room.db"  # directories are created
    first = open_log(path)
    assert first.fresh and first.last_seq == 0 and first.first_seq == 1
    sent = add(first, 25)
    first.close()

    again = open_log(path)
    assert not again.fresh
    assert (again.epoch, again.last_seq, again.first_seq) == (first.epoch, 25, 1)
    count, tail = again.tail(100)
    assert count == 10 and tail == b"".join(sent[-10:])  # recent loaded at start
    # Older than the in-memory tail: read from the file, same bytes.
    assert again.frames(1, 25, 1 << 20) == sent
    assert seqs(add(again, 2)) == [26, 27]
    again.close()


def test_a_new_or_deleted_database_starts_a_new_epoch(tmp_path):
    path = tmp_path / "room.db"
    first = open_log(path)
    add(first, 3)
    first.close()
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    second = open_log(path)
    assert second.fresh and second.epoch != first.epoch and second.last_seq == 0
    second.close()


def copy_database(source, target) -> None:
    """Copy a closed database file (a backup, or putting one back): the
    file alone, as `sqlite3 .backup` makes it, with no WAL beside it."""
    for suffix in ("-wal", "-shm"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)
    target.write_bytes(source.read_bytes())


def test_a_restored_backup_starts_a_new_epoch(tmp_path, caplog):
    """Members saw seqs 6..10; a backup holding 1..5 put back would give
    6..10 again to other events, which clients would skip as already shown."""
    path, backup = tmp_path / "room.db", tmp_path / "backup.db"
    first = open_log(path)
    add(first, 5)
    first.close()
    copy_database(path, backup)
    again = open_log(path)
    add(again, 5)
    again.close()
    copy_database(backup, path)

    restored = open_log(path)
    assert restored.epoch != first.epoch and not restored.fresh
    assert restored.last_seq == 5 and seqs(add(restored, 1)) == [6]
    assert "members may have seen up to 10" in caplog.text
    restored.close()
    reopened = open_log(path)  # from now on the new epoch carries on as usual
    assert (reopened.epoch, reopened.last_seq) == (restored.epoch, 6)
    reopened.close()


def test_reopening_keeps_the_epoch_with_or_without_the_lock_files_record(tmp_path):
    path = tmp_path / "room.db"
    first = open_log(path)
    add(first, 3)
    # A kill leaves the lock file as it was after the last commit.
    assert (tmp_path / "room.db.lock").read_text().splitlines()[1] == \
        f"seen {first.epoch} {3:020d}"
    first.close()
    (tmp_path / "room.db.lock").unlink()  # e.g. a lock file from an older server
    second = open_log(path)
    assert (second.epoch, second.last_seq) == (first.epoch, 3)
    second.close()


def test_frames_stop_at_the_byte_budget_but_never_return_nothing(tmp_path):
    roomlog = open_log(tmp_path / "room.db", recent=1)
    sent = add(roomlog, 20)
    assert roomlog.frames(1, 20, len(sent[0]) * 3) == sent[:3]
    assert roomlog.frames(1, 20, 1) == sent[:1]
    roomlog.close()


def test_a_read_error_is_raised_not_an_empty_answer(tmp_path):
    roomlog = open_log(tmp_path / "room.db", recent=2)
    add(roomlog, 5)
    roomlog._db.close()  # any sqlite3 error will do
    with pytest.raises(StorageError, match=r"^cannot read events 1\.\.5: "):
        roomlog.frames(1, 5, 1 << 20)
    assert len(roomlog.frames(4, 5, 1 << 20)) == 2  # the tail is in memory


def test_retention_hides_at_once_and_prunes_oldest_first_in_small_steps(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path, retain=100)
    add(roomlog, PRUNE_STEP + 500)
    assert roomlog.first_seq == roomlog.last_seq - 99  # gone for readers at once
    removed = []
    while step := roomlog.prune():
        removed.append(step)
        held = rows(path)
        # Contiguous from the oldest held to the newest after every step.
        assert held == list(range(held[0], roomlog.last_seq + 1))
    assert max(removed) <= PRUNE_STEP and len(removed) >= 2
    assert rows(path)[0] == roomlog.first_seq == roomlog.last_seq - 99
    roomlog.close()


def test_retain_days_prunes_by_age(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path, days=1.0)
    add(roomlog, 5)
    with sqlite3.connect(path) as db:  # make the first three two days old
        db.execute("UPDATE events SET ts = ts - 2 * 86400000 WHERE seq <= 3")
    assert roomlog.prune() == 3
    assert roomlog.prune() == 0
    assert roomlog.first_seq == 4 and rows(path) == [4, 5]
    roomlog.close()


def test_age_pruning_keeps_the_newest_event_so_seq_continues(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path, days=1.0)
    add(roomlog, 4)
    with sqlite3.connect(path) as db:  # all of them old
        db.execute("UPDATE events SET ts = ts - 2 * 86400000")
    assert roomlog.prune() == 3
    roomlog.close()
    again = open_log(path, days=1.0)
    assert (again.first_seq, again.last_seq) == (4, 4)
    assert seqs(add(again, 1)) == [5]  # not 1 again in the same epoch
    again.close()


def test_a_second_opener_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "room.db"
    holder = open_log(path)
    with pytest.raises(StorageError, match=r"in use by another chat server \(pid \d+"):
        open_log(path)
    holder.close()
    open_log(path).close()  # released on close


def test_a_corrupt_file_is_one_line(tmp_path):
    path = tmp_path / "room.db"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StorageError) as caught:
        open_log(path)
    assert str(caught.value) == f"cannot use the room database {path}: file is not a database"


def fill_until_full(roomlog: SqliteLog) -> int:
    """Commit 2 KB messages until storage refuses; return the last stored seq."""
    for _ in range(1000):  # bounded: the cap is a few pages
        roomlog.stage({"type": "message", "from": "a@127.0.0.1", "text": "x" * 2000, "ts": 1})
        try:
            roomlog.commit()
        except StorageError:
            return roomlog.last_seq
    raise AssertionError("storage never filled up")


def test_a_full_disk_refuses_the_turn_then_recovers_by_itself(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path)
    roomlog._db.execute("PRAGMA max_page_count=1")  # no growth from here on
    last = fill_until_full(roomlog)
    assert roomlog.degraded == "storage: database or disk is full"
    assert roomlog.staged == 0 and roomlog.last_seq == last  # the turn was dropped
    assert rows(path)[-1] == last
    roomlog.prune()  # the tick's probe: still full
    assert roomlog.degraded is not None

    roomlog._db.execute("PRAGMA max_page_count=1000000")  # space again
    roomlog.prune()
    assert roomlog.degraded is None  # cleared without waiting for a message
    assert seqs(add(roomlog, 1)) == [last + 1]  # numbers stay consecutive
    roomlog.close()


def test_pruning_makes_room_on_a_full_disk(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path, retain=1_000_000)
    roomlog._db.execute("PRAGMA max_page_count=1")
    last = fill_until_full(roomlog)
    roomlog.retain_events = 2  # the operator's retention, as after a restart
    while roomlog.prune():
        pass
    roomlog.stage({"type": "message", "from": "a@127.0.0.1", "text": "after", "ts": 1})
    assert seqs(roomlog.commit()) == [last + 1]
    assert roomlog.degraded is None
    roomlog.close()


def test_open_reads_no_more_than_the_tail(tmp_path):
    # Start-up must not scan the table: MIN/MAX use the rowid B-tree, the
    # tail a range search (SQLite's own plan says so).
    path = tmp_path / "room.db"
    open_log(path).close()
    with sqlite3.connect(path) as db:
        plans = [" ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
                 for sql, params in ((sqlitelog._BOUNDS, ()), (sqlitelog._TAIL, (5,)))]
    assert "SCAN events" not in plans[0] and plans[0].count("SEARCH events") == 2, plans
    assert "SEARCH events USING INTEGER PRIMARY KEY" in plans[1], plans


def test_timestamps_are_commit_times_in_ms(tmp_path):
    path = tmp_path / "room.db"
    roomlog = open_log(path)
    before = int(time.time() * 1000)
    add(roomlog, 1)
    with sqlite3.connect(path) as db:
        (ts,) = db.execute("SELECT ts FROM events").fetchone()
    assert before <= ts <= int(time.time() * 1000)
    roomlog.close()
