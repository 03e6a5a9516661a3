"""The room log on disk, through real server subprocesses and real files:
restarts (clean and kill -9), history from the database, retention, and
every storage fault (README, "The room log")."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Program, RawClient

FAST = ("--msg-rate=100000", "--msg-burst=100000", "--max-per-ip=50")


def room_events(client: RawClient, count: int) -> list[dict]:
    """The next ``count`` room events (anything with a seq)."""
    events = []
    while len(events) < count:
        msg = client.recv()
        if "seq" in msg:
            events.append(msg)
    return events


def say(client: RawClient, text: str) -> dict:
    """Say ``text``; return our own message as the room delivered it, or
    the error frame that refused it."""
    client.send({"type": "say", "text": text})
    reply, _ = client.recv_until(lambda m: m["type"] == "error" or (
        m["type"] == "message" and m["text"] == text))
    return reply


def history_before(client: RawClient, before: int, limit: int = 200) -> tuple[dict, list[dict]]:
    client.send({"type": "history", "before": before, "limit": limit})
    header = client.recv_type("history")
    return header, [client.recv() for _ in range(header["count"])]


def whole_history(client: RawClient) -> list[dict]:
    """Every event the room holds, paged back with ``before``, oldest first."""
    pages: list[list[dict]] = []
    before = client_last_seq(client) + 1
    for _ in range(10_000):  # bounded: 200 per page
        header, page = history_before(client, before)
        pages.append(page)
        if not header["more"]:
            break
        before = page[0]["seq"]
    return [event for page in reversed(pages) for event in page]


def client_last_seq(client: RawClient) -> int:
    """The room's last seq: an empty ``history after`` far back says."""
    client.send({"type": "history", "after": 0, "limit": 1})
    client.recv_type("history")
    return client.recv()["seq"]


def stored_seqs(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM events ORDER BY seq")]


# --- restarts --------------------------------------------------------------

def test_a_restart_keeps_the_epoch_and_seq_continues(start_server, open_client, tmp_path):
    db = tmp_path / "room.db"
    first = start_server(f"--db={db}", "--shutdown-grace=0.5")
    first.wait_log(re.escape(f"room log: sqlite {db} (new database, a new epoch;"))
    alice = open_client(first.port)
    welcome = alice.join("alice")
    said = say(alice, "before the restart")
    assert first.terminate() == 0  # a shutdown records no leaves
    alice.close()

    second = start_server(f"--db={db}", "--shutdown-grace=0.5")
    second.wait_log(re.escape(f"room log: sqlite {db} (keeps 1000000 events)"))
    bob = open_client(second.port)
    again = bob.join("bob")
    assert again["epoch"] == welcome["epoch"]
    assert again["last_seq"] == said["seq"]
    assert say(bob, "after")["seq"] == said["seq"] + 2  # after bob's join
    bob.close()
    assert second.terminate() == 0

    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    third = start_server(f"--db={db}")
    carol = open_client(third.port)
    fresh = carol.join("carol")
    assert fresh["epoch"] != welcome["epoch"] and fresh["last_seq"] == 0


def test_a_backup_put_back_starts_a_new_epoch_so_no_seq_means_two_events(
        start_server, open_client, tmp_path):
    db, backup = tmp_path / "room.db", tmp_path / "backup.db"
    first = start_server(f"--db={db}")
    alice = open_client(first.port)
    welcome = alice.join("alice")
    say(alice, "kept in the backup")
    assert first.terminate() == 0
    alice.close()
    backup.write_bytes(db.read_bytes())  # a stopped server's file is whole

    second = start_server(f"--db={db}")
    bob = open_client(second.port)
    bob.join("bob")
    lost = say(bob, "said after the backup")
    bob.close()
    second.kill()  # a crash, then the operator puts the backup back
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(backup.read_bytes())

    third = start_server(f"--db={db}")
    third.wait_log(f"members may have seen up to {lost['seq']}")
    carol = open_client(third.port)
    again = carol.join("carol")
    # The file's numbers end below what bob saw: the same epoch would give
    # bob's seqs to new events, and bob would skip them as already shown.
    assert again["epoch"] != welcome["epoch"]
    assert again["last_seq"] < lost["seq"]
    carol.close()
    assert third.terminate() == 0


def test_members_a_crash_stranded_are_shown_leaving_after_the_restart(start_server,
                                                                      open_client, tmp_path):
    db = tmp_path / "room.db"
    first = start_server(f"--db={db}")
    alice, bob = open_client(first.port, "alice"), open_client(first.port, "bob")
    bob.send({"type": "quit"})  # left properly: no second leave for bob
    alice.recv_type("leave")
    open_client(first.port, "carol")
    alice.recv_type("join")
    first.kill()  # alice and carol were in the room; nobody said they left

    second = start_server(f"--db={db}")
    dave = open_client(second.port)
    dave.send({"type": "hello", "name": "dave"})
    welcome = dave.recv_type("welcome")
    replay = [dave.recv() for _ in range(welcome["history"])]
    stranded = [(e["member"], e["reason"]) for e in replay[-2:]]
    assert sorted(stranded) == [("alice@127.0.0.1", "hung_up"), ("carol@127.0.0.1", "hung_up")]
    assert [e["type"] for e in replay[-2:]] == ["leave", "leave"]
    dave.send({"type": "quit"})
    assert dave.closed_by_server()
    # An orderly stop strands nobody: the next start announces no leaves.
    assert second.terminate() == 0
    third = start_server(f"--db={db}")
    erin = open_client(third.port)
    again = erin.join("erin")
    # dave joined and quit; the orderly stop added no leaves at this start.
    assert again["last_seq"] == welcome["last_seq"] + 2


def test_kill_9_during_a_burst_loses_nothing_anyone_received(start_server, tmp_path):
    db = tmp_path / "room.db"
    server = start_server(f"--db={db}", *FAST)
    names = ("ann", "ben", "cat")
    members = [RawClient(server.port) for _ in names]
    welcomes = [member.join(name) for member, name in zip(members, names)]
    received: dict[str, list[dict]] = {name: [] for name in names}
    stop = threading.Event()

    def record(name: str, member: RawClient) -> None:
        try:
            while True:
                msg = member.recv(timeout=10)
                if "seq" in msg:
                    received[name].append(msg)
        except (EOFError, OSError, TimeoutError):
            pass

    def publish(name: str, member: RawClient) -> None:
        try:
            for i in range(3000):  # bounded; the kill comes long before
                if stop.is_set():
                    return
                member.send({"type": "say", "text": f"{name} {i}"})
                if i % 50 == 49:
                    time.sleep(0.005)  # let the readers keep up: no slow-reader evictions
        except OSError:
            pass  # the server died under us

    threads = [threading.Thread(target=target, args=(name, member), daemon=True)
               for name, member in zip(names, members) for target in (record, publish)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(received["ann"]) < 500 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL, mid-burst
    stop.set()
    for thread in threads:
        thread.join(15)
    for member in members:
        member.close()
    seen = {event["seq"]: event for events in received.values() for event in events}
    assert len(seen) >= 500, "the burst never got going"

    restarted = start_server(f"--db={db}", "--history-replay=100000")
    checker = RawClient(restarted.port)
    try:
        welcome = checker.join("checker")
        assert welcome["epoch"] == welcomes[0]["epoch"]
        history = whole_history(checker)
        # Also in one `after` request, from the very start.
        checker.send({"type": "history", "after": 0})
        header = checker.recv_type("history")
        assert header["missed"] == 0
        assert [checker.recv() for _ in range(header["count"])] == history
    finally:
        checker.close()
    by_seq = {event["seq"]: event for event in history}
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    for name, events in received.items():
        assert events, name
        for event in events:
            assert by_seq.get(event["seq"]) == event, (name, event)
    # seq continues after the last stored event: the checker's join.
    assert history[-1]["type"] == "join" and history[-1]["member"].startswith("checker@")
    assert history[-1]["seq"] > max(seen)


# --- history from the database ---------------------------------------------

def test_history_reaches_past_the_in_memory_tail(start_server, open_client):
    server = start_server("--history=5", *FAST)
    alice = open_client(server.port)
    alice.join("alice")
    for i in range(40):
        alice.send({"type": "say", "text": f"m{i}"})
    events = room_events(alice, 40)
    last = events[-1]["seq"]

    alice.send({"type": "history", "after": 3})  # older than the 5 in memory
    header = alice.recv_type("history")
    assert header == {"type": "history", "after": 3, "count": last - 3, "missed": 0}
    replay = [alice.recv() for _ in range(header["count"])]
    assert [e["seq"] for e in replay] == list(range(4, last + 1))
    assert replay == events[2:]  # events are seq 2 (after the join) onwards

    # Scrolling back: pages of 7, each oldest first, until the room's start.
    before, pages = last + 1, []
    for _ in range(20):
        header, page = history_before(alice, before, limit=7)
        assert header["before"] == before and header["count"] == len(page) <= 7
        pages.append(page)
        if not header["more"]:
            break
        before = page[0]["seq"]
    scrolled = [event for page in reversed(pages) for event in page]
    assert [e["seq"] for e in scrolled] == list(range(1, last + 1))
    assert scrolled[-40:] == events and scrolled[0]["type"] == "join"


def test_numbers_from_another_epoch_are_unknown_seq(start_server, open_client):
    server = start_server()
    alice = open_client(server.port)
    alice.join("alice")
    last = say(alice, "hi")["seq"]
    for request in ({"after": last + 5}, {"before": last + 2}):
        alice.send({"type": "history", **request})
        error = alice.recv_type("error")
        assert error["code"] == "unknown_seq"
        anchor = request.get("after", request.get("before"))
        assert error["message"] == (f"seq {anchor} was never issued in this room (the last "
                                    f"is {last}); your numbers are from another epoch")
    assert say(alice, "still here")["seq"] == last + 1  # not a closing error


def test_retention_prunes_the_file_and_history_reports_the_missed(start_server, open_client,
                                                                  tmp_path):
    db = tmp_path / "room.db"
    server = start_server(f"--db={db}", "--retain-events=10", "--history=3", *FAST)
    alice = open_client(server.port)
    alice.join("alice")
    for i in range(2500):  # more than two prune steps of 1000
        alice.send({"type": "say", "text": f"m{i}"})
    events = room_events(alice, 2500)
    last = events[-1]["seq"]
    alice.send({"type": "history", "after": 0})
    header = alice.recv_type("history")
    assert header == {"type": "history", "after": 0, "count": 10, "missed": last - 10}
    assert [alice.recv() for _ in range(10)] == events[-10:]
    header, page = history_before(alice, last + 1, limit=50)
    assert (header["count"], header["more"]) == (10, False) and page == events[-10:]
    # The file follows, oldest first and in steps, from the timer.
    deadline = time.monotonic() + 20
    while (held := stored_seqs(db)) != list(range(last - 9, last + 1)):
        assert held == list(range(held[0], last + 1))  # always contiguous
        assert time.monotonic() < deadline, held[:3]
        time.sleep(0.1)


# --- storage faults ----------------------------------------------------------

def start_failing(tmp_path: Path, *args: str, **popen) -> Program:
    """A server expected not to start; return it once it exited."""
    program = Program(tmp_path, "-m", "tcpserver", "--name=server", "--port=0", *args, **popen)
    program.proc.wait(15)
    program.kill()
    return program


def one_error_line(program: Program) -> str:
    text = program.log_text()
    assert "Traceback" not in text and "listening on" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_corrupt_database_is_one_line_and_exit_1(tmp_path):
    db = tmp_path / "room.db"
    db.write_bytes(b"certainly not SQLite\n" * 500)
    program = start_failing(tmp_path, f"--db={db}")
    assert program.proc.returncode == 1
    assert one_error_line(program).endswith(
        f"ERROR cannot use the room database {db}: file is not a database")


def test_a_database_path_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    program = start_failing(tmp_path, f"--db={blocker}/room.db")
    assert program.proc.returncode == 1
    assert one_error_line(program).endswith(
        f"ERROR cannot use the room database {blocker}/room.db: {blocker} is not a directory")


@pytest.fixture
def read_only():
    """``read_only(path)``: make a file or directory unwritable for the
    server: its mode for a normal user; for root, which ignores modes, the
    immutable attribute (chattr +i).  Undone at teardown."""
    undo: list[list[str] | Path] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o555 if path.is_dir() else 0o444)
            undo.append(path)
            return
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"root, and chattr +i is not available here: {done.stderr.strip()}")
        undo.append(["chattr", "-i", str(path)])

    yield make
    for item in reversed(undo):
        if isinstance(item, Path):
            item.chmod(0o755 if item.is_dir() else 0o644)
        else:
            subprocess.run(item, check=True)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_an_unwritable_database_is_one_line_and_exit_1(start_server, tmp_path, read_only,
                                                       what):
    db = tmp_path / "state" / "room.db"
    assert start_server(f"--db={db}").terminate() == 0  # a good database...
    read_only(db if what == "file" else db.parent)  # ...that cannot be written now
    program = start_failing(tmp_path, f"--db={db}")
    assert program.proc.returncode == 1
    line = one_error_line(program)
    assert f"ERROR cannot use the room database {db}: " in line
    assert re.search(r"readonly|read-only|Permission denied|not permitted|unable to open",
                     line), line


def test_a_second_server_on_the_same_database_is_refused_naming_the_first(
        start_server, open_client, tmp_path):
    db = tmp_path / "room.db"
    first = start_server(f"--db={db}")
    second = start_failing(tmp_path, f"--db={db}")
    assert second.proc.returncode == 1
    assert one_error_line(second).endswith(
        f"ERROR the room database {db} is in use by another chat server (pid "
        f"{first.proc.pid}, see {db}.lock); stop it or choose another file with --db")
    alice = open_client(first.port)  # the first is untouched
    alice.join("alice")
    # Its lock dies with it, even by SIGKILL.
    first.kill()
    start_server(f"--db={db}")


def test_a_symlink_to_a_database_in_use_is_refused_too(start_server, tmp_path):
    db = tmp_path / "room.db"
    first = start_server(f"--db={db}")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "room.db"
    link.symlink_to(db)
    second = start_failing(tmp_path, f"--db={link}")
    assert second.proc.returncode == 1
    assert f"is in use by another chat server (pid {first.proc.pid}" in one_error_line(second)


def test_a_full_disk_refuses_messages_then_the_room_recovers_by_itself(
        start_server, open_client, tmp_path):
    db, cap = tmp_path / "room.db", tmp_path / "max-pages"
    cap.write_text("1")  # the file may not grow from the start
    server = start_server(f"--db={db}", *FAST,
                          env={"CHATROOM_TEST_DB_MAX_PAGES_FILE": str(cap)})
    alice, bob = open_client(server.port), open_client(server.port)
    alice.join("alice")
    bob.join("bob")
    delivered, refused = [], []
    for i in range(200):  # bounded: the few free pages fill in a few dozen
        reply = say(alice, f"{i} " + "x" * 3000)
        if reply["type"] == "error":
            refused.append(f"{i} ")
            break
        delivered.append(reply)
    assert refused and reply["code"] == "room_unavailable", reply
    for i in range(3):  # more refusals in the same episode
        assert say(alice, f"again {i} " + "x" * 3000)["code"] == "room_unavailable"
    alice.send({"type": "ping", "token": "t"})
    assert alice.recv_type("pong") == {"type": "pong", "token": "t",
                                       "degraded": "storage: database or disk is full"}
    assert server.log_text().count("database or disk is full; events are not") == 1

    cap.write_text("1000000")  # space again
    for _ in range(100):  # bounded: the probe runs every 0.25 s
        alice.send({"type": "ping", "token": "t"})
        if "degraded" not in alice.recv_type("pong"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("still degraded")
    server.wait_log("storing works again")
    after = say(alice, "after the disk was freed")
    assert after["type"] == "message" and after["seq"] == delivered[-1]["seq"] + 1

    # Bob saw exactly what the log holds: the refused messages nowhere.
    bob_saw = room_events(bob, len(delivered) + 1)
    assert [e["seq"] for e in bob_saw] == [e["seq"] for e in delivered] + [after["seq"]]
    history = whole_history(bob)
    assert [e for e in history if e["seq"] >= delivered[0]["seq"]] == bob_saw
    assert not any(e.get("text", "").startswith(tuple(refused)) or
                   e.get("text", "").startswith("again") for e in history)


def test_the_launcher_passes_db_through(tmp_path):
    db = tmp_path / "launched.db"
    launcher = Program(tmp_path, "-m", "gateway.cli", "--port=0", "--http-port=0",
                       f"--db={db}", "--retain-events=500")
    try:
        launcher.wait_log(re.escape(f"room log: sqlite {db} (new database, a new epoch; "
                                    "keeps 500 events)"))
        launcher.wait_log("open http")
        assert launcher.signal(signal.SIGTERM) == 0
    finally:
        launcher.kill()
    assert db.exists()


def test_the_start_up_benchmark_runs(tmp_path):
    # A tiny run of tests/bench/startup.py, so the script README quotes works.
    done = subprocess.run([sys.executable, "tests/bench/startup.py", "--events=3000",
                           "--runs=1", f"--dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"database: [\d,]+ bytes, [\d,]+ bytes per 1,000 events", done.stdout)
    assert re.search(r"3000 events: start-up [\d.]+ s median .* RSS [\d.]+ MiB", done.stdout)


def test_a_damaged_page_cuts_a_history_reply_with_a_close_not_a_short_reply(
        start_server, open_client, tmp_path):
    # Damage deep in the file is found only when read (start-up reads the
    # ends); the member whose reply needed it is closed, the room goes on.
    from tcpserver import protocol
    from tcpserver.sqlitelog import SqliteLog

    db = tmp_path / "room.db"
    roomlog = SqliteLog(db, protocol.MAX_FRAME_SIZE, 10, 1_000_000)
    for _ in range(3):
        for i in range(1000):
            roomlog.stage({"type": "message", "from": "a@127.0.0.1", "text": f"m{i}", "ts": 1})
        roomlog.commit()
    roomlog.close()  # checkpointed into the file itself
    size = db.stat().st_size
    with open(db, "r+b") as f:  # a leaf in the middle: old events only
        f.seek((size // 4096 // 2) * 4096)
        f.write(b"\xff" * 4096)
    server = start_server(f"--db={db}", "--history=5", "--history-replay=5000")
    alice = open_client(server.port)
    alice.join("alice")
    alice.send({"type": "history", "after": 0})
    header = alice.recv_type("history")
    assert header["count"] == 3001
    assert alice.closed_by_server(10)
    server.wait_log(r"history reply cut short, closing: cannot read events \d+\.\.\d+: ")
    bob = open_client(server.port)
    bob.join("bob")
    assert say(bob, "still up")["type"] == "message"
    assert "Traceback" not in server.log_text()
