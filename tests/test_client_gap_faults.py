"""The terminal client filling a gap under faults: the link dropping again
mid-fill into a new epoch, the room unable to read its history (Redis
away), and history replies cut short by retention while they are sent.  A
real server subprocess (and redis-server), the client as a piped
subprocess, and a relay that cuts, holds or backs up its link."""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import pytest
from conftest import RawClient
from test_client import Terminal
from test_client_gaps import SERVER, Member, away, room_lines
from test_client_resume import TIME, Proxy

from tcpserver import transcript

pytest_plugins = ["redis_fixtures"]


class CuttingProxy(Proxy):
    """A relay that acts the moment the client sends a frame holding
    ``cut_on``: it cuts every link and holds (that frame is not passed on),
    or with ``gate`` it holds that frame back until ``gate`` is set.  While
    ``stalled`` it reads nothing from the server (its output backs up)."""

    def __init__(self, target: int, cut_on: bytes,
                 gate: threading.Event | None = None) -> None:
        self.cut_on = cut_on
        self.gate = gate
        self.tripped = threading.Event()
        self.stalled = False  # True: nothing is read from the server meanwhile
        super().__init__(target)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a] if self.stalled else [a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is a and self.cut_on in data and not self.tripped.is_set():
                        self.tripped.set()
                        if self.gate is None:
                            self.held = True
                            self.cut()
                            return
                        self.gate.wait(30)
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return  # cut: a socket was closed under us


def bob_behind(server, cut_on: bytes, request, piped, open_client, gated: bool = True):
    """bob (a piped terminal client) behind a CuttingProxy acting on
    ``cut_on``, and alice (a raw member), both joins seen; returns (relay,
    gate, bob, alice).  ``gated``: the relay holds that frame until
    ``gate`` is set; else it cuts (and ``gate`` is None)."""
    gate = threading.Event() if gated else None
    relay = CuttingProxy(server.port, cut_on, gate)
    if gate is not None:
        request.addfinalizer(gate.set)
    request.addfinalizer(relay.close)
    bob = piped(relay.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = Member(open_client(server.port), "alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    return relay, gate, bob, alice


@pytest.mark.parametrize("cut_on", [b'"after"', b'"before"'])
def test_a_new_epoch_after_a_drop_in_the_middle_of_filling_a_gap_starts_afresh(
        start_server, piped, open_client, request, cut_on):
    # The link drops once more while the gap is being filled (before the
    # reply to history after, or while its missed events are fetched), and
    # the server comes back with a new transcript.  The client must show
    # the new room, not sit on what it held from the old one (before: with
    # the after request cut it held every event for ever and took no input;
    # with a before request cut it showed the old transcript's held events
    # as new ones and then skipped the new room's events as seen).
    server = start_server(*SERVER, "--db=:memory:")
    relay, _, bob, alice = bob_behind(server, cut_on, request, piped, open_client,
                                      gated=False)
    relay.tripped.set()  # the first cut is away()'s own
    away(relay, bob, alice, [f"away {n:03d}" for n in range(300)])
    relay.tripped.clear()
    assert relay.tripped.wait(20), "the client did not ask for the gap"
    server.kill()
    restarted = start_server(*SERVER, "--db=:memory:")
    relay.target = restarted.port
    carol = Member(open_client(restarted.port), "carol")
    for n in range(3):
        carol.say(f"fresh {n}")
    carol.read_until(lambda m: m.get("text") == "fresh 2")
    relay.held = False
    bob.expect(transcript.NEW_EPOCH.replace("(", r"\(").replace(")", r"\)"), key="err",
               timeout=20)
    for n in range(3):
        bob.expect(rf"^{TIME} (\(history\) )?carol@127.0.0.1: fresh {n}$")
    bob.type("back")
    carol.read_until(lambda m: m.get("text") == "back")
    assert bob.finish() == 0
    out = bob.text()
    # Nothing of the old transcript after the new one began.
    assert "away" not in out[out.index("carol@127.0.0.1"):], out
    assert "Traceback" not in bob.text("err")


def test_a_gap_page_the_room_cannot_read_leaves_a_hole_not_a_frozen_client(
        start_redis, start_server, piped, open_client, request):
    # Redis goes away just as a gap page is asked for (older than the
    # node's memory copy, so read from the stream): the reply is
    # room_unavailable.  The client must show what it holds and leave the
    # rest to /history, not hold every event and all input for ever.
    redis = start_redis(persist=True)
    server = start_server(*SERVER, f"--redis={redis.url}")
    relay, gate, bob, alice = bob_behind(server, b'"before"', request, piped, open_client)
    away(relay, bob, alice, [f"away {n:02d}" for n in range(30)])
    assert relay.tripped.wait(20), "the client did not ask for the gap"
    redis.kill()
    ping_until(alice, degraded=True)
    gate.set()  # the page is asked for now, while Redis is away
    bob.expect(r"^! .*room_unavailable|cannot", key="err")
    redis.start()
    ping_until(alice, degraded=False)
    alice.say("redis is back")
    bob.expect(rf"^{TIME} alice@127.0.0.1: redis is back$", timeout=20)
    hole = re.search(r"^! (\d+) earlier events from while you were away are not shown "
                     r"\(/history shows them\)$", bob.text("err"), re.M)
    assert hole, bob.text("err")
    bob.type("/history 200")
    bob.expect(r"^\* that closes the gap$")
    bob.type("done")
    alice.read_until(lambda m: m.get("text") == "done")
    assert bob.finish() == 0
    assert "Traceback" not in bob.text("err")


def test_a_gap_page_cut_short_by_retention_does_not_freeze_the_client(
        start_server, piped, open_client, request, tmp_path):
    # The server streams a history reply as the client drains it, and skips
    # events that retention drops meanwhile: the reply then holds fewer
    # events than its header's count.  Here the page of the gap is asked
    # while the client's link is backed up, and the room talks on until the
    # page's events are past --retain-events.  The client must end the
    # page at the first live event (the server sends none within a reply)
    # and say what is lost, not wait for the missing events for ever.
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}", "--retain-events=950",
                          "--slow-reader-bytes=67108864")
    relay, gate, bob, alice = bob_behind(server, b'"before"', request, piped, open_client)
    away(relay, bob, alice, [f"away {n:03d}" for n in range(300)])
    assert relay.tripped.wait(20), "the client did not ask for the gap"
    # Back up bob's link (about 10 MB), then let the page be asked: the
    # server answers with a header at once, its events to follow.
    relay.stalled = True
    for n in range(600):
        alice.say(f"big {n:03d} " + "\U0001F600" * 3900)
    alice.read_until(lambda m: m.get("text", "").startswith("big 599 "))
    gate.set()
    for n in range(400):  # the page's events pass retention
        alice.say(f"on {n:03d}")
    relay.stalled = False
    bob.expect(rf"^{TIME} alice@127.0.0.1: on 399$", timeout=60)
    # Bob saw 1-2; his welcome replayed 299-303 and the reply after 2 missed
    # 3-299; the page asked for (99-298) was gone by the time it was sent.
    assert re.findall(r"^! (\d+) events from while you were away are no longer kept by the "
                      r"server$", bob.text("err"), re.M) == ["296"], bob.text("err")
    bob.type("back")
    seen = alice.transcript("back")
    assert bob.finish() == 0
    assert room_lines(bob.text())[:-1] == [seen[seq] for seq in sorted(seen)
                                           if seq <= 2 or seq >= 299]
    assert "Traceback" not in bob.text("err")


def test_an_after_reply_cut_short_by_retention_is_counted_not_skipped(
        start_server, piped, open_client, request, tmp_path):
    # The reply to history after can come short the same way: here its
    # oldest 200 events pass --retain-events while bob's link is backed up.
    # Those must count as part of the gap (fetched, or said to be lost),
    # not vanish between the gap and what came.
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}", "--history=1",
                          "--history-replay=2000", "--retain-events=2100",
                          "--slow-reader-bytes=67108864", "--msg-rate=5000",
                          "--msg-burst=5000")
    # bob's join is seq 1, alice's 2.
    relay, gate, bob, alice = bob_behind(server, b'"after"', request, piped, open_client)
    relay.tripped.set()  # the first cut is away()'s own
    away(relay, bob, alice, [f"away {n:04d}" for n in range(3000)])  # 3: leave, 4-3003
    relay.tripped.clear()
    assert relay.tripped.wait(20), "the client did not ask for the gap"  # after 3004, its join
    relay.stalled = True
    for n in range(600):  # 3005-3604, about 10 MB: more than the sockets between take
        alice.say(f"big {n:03d} " + "\U0001F600" * 3900)
    alice.read_until(lambda m: m.get("text", "").startswith("big 599 "))
    gate.set()  # the reply after 2: missed 3-1604, replays 1605-3604
    alice.raw.send({"type": "ping", "token": "asked"})
    alice.read_until(lambda m: m.get("token") == "asked")
    for n in range(300):  # 3605-3904: 1605-1804 pass retention before they are sent
        alice.say(f"on {n:03d}")
    relay.stalled = False
    bob.expect(rf"^{TIME} alice@127.0.0.1: on 299$", timeout=60)
    assert re.findall(r"^! (\d+) events from while you were away are no longer kept by the "
                      r"server$", bob.text("err"), re.M) == ["1802"], bob.text("err")
    assert bob.finish() == 0
    assert "Traceback" not in bob.text("err")


def ping_until(member: Member, degraded: bool, timeout: float = 20.0) -> None:
    """Ping until the pong says the room is (or is no longer) degraded."""
    deadline = time.monotonic() + timeout
    while True:
        member.raw.send({"type": "ping", "token": "health"})
        pong, seen = member.raw.recv_until(lambda m: m.get("token") == "health")
        member.events += [m for m in seen if "seq" in m]
        if bool(pong.get("degraded")) == degraded:
            return
        assert time.monotonic() < deadline, f"degraded never became {degraded}"
        time.sleep(0.1)


def test_enter_while_the_gap_is_filled_says_so_and_sends_once_done(start_server, request):
    # Back in the room but still fetching the gap: Enter keeps the line and
    # says why (it said "not connected: reconnecting" under "reconnected").
    server = start_server(*SERVER)
    gate = threading.Event()
    relay = CuttingProxy(server.port, b'"before"', gate)
    request.addfinalizer(gate.set)
    request.addfinalizer(relay.close)
    term = Terminal(relay.port, "bob")
    request.addfinalizer(term.close)
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    alice = Member(RawClient(server.port), "alice")
    request.addfinalizer(alice.raw.close)
    relay.tripped.set()  # the first cut is ours
    relay.held = True
    relay.cut()
    term.wait(lambda: "! the connection was lost; reconnecting (Ctrl-C to stop)"
              in term.rows(), "the reconnecting line")
    for n in range(30):
        alice.say(f"away {n:02d}")
    alice.read_until(lambda m: m.get("text") == "away 29")
    relay.tripped.clear()
    relay.held = False
    assert relay.tripped.wait(20), "the client did not ask for the gap"
    term.wait(lambda: any(r.startswith("* reconnected as bob@127.0.0.1") for r in term.rows()),
              "the return")
    term.child.send("kept line\r")
    term.wait(lambda: any("catching up on what you missed; the line is kept" in r
                          for r in term.rows()), "the refusal")
    gate.set()
    term.wait(lambda: any(r.endswith("alice@127.0.0.1: away 29") for r in term.rows()),
              "the gap filled")
    term.child.send("\r")
    alice.read_until(lambda m: m.get("text") == "kept line")
