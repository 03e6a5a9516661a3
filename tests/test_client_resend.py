"""What the terminal client sends again after a drop: a piped line whose
echo the drop cut off is said once (its echo is looked for in the part of
the gap the fill leaves unshown), a line the room never got is still said,
and a ``/history`` cut off is aimed anew once back.  A real server
subprocess, the client as a piped subprocess and a relay that cuts its link
(test_client_gap_faults); then the search's rules with no I/O."""

from __future__ import annotations

import re

import pytest
from test_client_gap_faults import bob_behind
from test_client_gaps import SERVER, Member
from test_client_resume import RECONNECTING, TIME

from tcpserver import client_echo, transcript
from tcpserver.client_echo import ABSENT, AGAIN, FOUND, UNKNOWN, EchoSearch

HOLE_LINE = (r"^! (\d+) earlier events from while you were away are not shown "
             r"\(/history shows them\)$")


def busy_while_away(relay, bob, alice: Member, count: int = transcript.GAP_FILL + 50) -> None:
    """With bob's link cut (and held down), alice says ``count`` lines;
    then bob may come back."""
    bob.expect(RECONNECTING, key="err")
    alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    for n in range(count):
        alice.say(f"away {n:04d}")
    alice.read_until(lambda m: m.get("text") == f"away {count - 1:04d}")
    relay.stalled = False
    relay.held = False


def said(alice: Member, text: str) -> list[int]:
    """The seqs of the messages ``text`` that alice has read (only bob talks so)."""
    return [m["seq"] for m in alice.events if m["type"] == "message" and m["text"] == text]


def test_a_line_whose_echo_falls_in_the_hole_is_not_said_twice(
        start_server, piped, open_client, request, tmp_path):
    # bob's line reaches the room, but the link drops before its echo
    # reaches him; alice then says more than the fill fetches, so the echo
    # (the oldest event of the gap) is in the hole the fill leaves.  Before:
    # bob never saw it and sent the line again: the room had it twice.
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, gate, bob, alice = bob_behind(server, b"said once", request, piped, open_client)
    bob.type("said once")
    assert relay.tripped.wait(20), "the client did not send the line"
    relay.stalled = True  # nothing more reaches bob: not the echo
    gate.set()  # the line goes on to the server
    alice.read_until(lambda m: m.get("text") == "said once")
    relay.held = True
    relay.cut()
    busy_while_away(relay, bob, alice)
    hole = int(bob.expect(HOLE_LINE, key="err", timeout=30).group(1))
    bob.type("next line")
    alice.read_until(lambda m: m.get("text") == "next line", timeout=30)
    assert said(alice, "said once") == [3], said(alice, "said once")
    assert said(alice, "next line")
    # The echo stays in the hole, for /history, like the rest of it.
    bob.type(f"/history {hole}")
    bob.expect(r"^\* that closes the gap$", timeout=20)
    assert bob.finish() == 0
    assert re.search(rf"^{TIME} \(history\) bob@127.0.0.1: said once$", bob.text(), re.M)
    assert len(re.findall("said once$", bob.text(), re.M)) == 1, bob.text()
    assert "cannot tell" not in bob.text("err") and "Traceback" not in bob.text("err")


@pytest.mark.parametrize("restart", [False, True])
def test_a_drop_in_the_middle_of_the_search_searches_again_once_back(
        start_server, piped, open_client, request, tmp_path, restart):
    # As above, then the link drops again just as the search asks for its
    # first page.  Same room: the search runs again once back (the hole is
    # still where it was) and finds the echo.  With restart, the server
    # comes back on a new database (a new transcript): the old numbers
    # mean nothing, so the client cannot tell, says so, and sends the line.
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, gate, bob, alice = bob_behind(server, b"said once", request, piped, open_client)
    bob.type("said once")
    assert relay.tripped.wait(20), "the client did not send the line"
    relay.stalled = True
    gate.set()
    alice.read_until(lambda m: m.get("text") == "said once")
    relay.held = True
    relay.cut()
    relay.cut_on, relay.gate = b"echo-search", None  # next: cut on the search's page
    relay.tripped.clear()
    busy_while_away(relay, bob, alice)
    assert relay.tripped.wait(30), "the client did not search the hole"
    if restart:
        server.kill()
        server = start_server(*SERVER, f"--db={tmp_path / 'other.db'}")
        relay.target = server.port
        alice = Member(open_client(server.port), "alice")
        alice.read_until(lambda m: m["type"] == "join")
    else:
        alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    relay.held = False
    alice.read_until(lambda m: m["type"] == "join" and m["member"] == "bob@127.0.0.1",
                     timeout=30)
    bob.type("next line")
    alice.read_until(lambda m: m.get("text") == "next line", timeout=30)
    assert bob.finish() == 0
    assert len(re.findall(RECONNECTING, bob.text("err"), re.M)) == 2
    if restart:
        assert said(alice, "said once") == [3]  # alice's join, bob's, then the line
        assert re.search(r"^! cannot tell whether a line sent before the drop reached the "
                         r"room \(the server started a new transcript\): sending it again$",
                         bob.text("err"), re.M), bob.text("err")
    else:
        assert said(alice, "said once") == [3]
        assert "cannot tell" not in bob.text("err")
    assert "Traceback" not in bob.text("err")


def test_a_line_the_room_never_got_is_sent_after_the_drop_even_past_a_hole(
        start_server, piped, open_client, request, tmp_path):
    # The same gap, but the line is cut off before the server reads it: the
    # search finds bob's own leave (his old connection said nothing after
    # it) before any echo, so the line is sent again, once.
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, _, bob, alice = bob_behind(server, b"said once", request, piped, open_client,
                                      gated=False)
    bob.type("said once")
    assert relay.tripped.wait(20), "the client did not send the line"
    busy_while_away(relay, bob, alice)
    bob.expect(HOLE_LINE, key="err", timeout=30)
    alice.read_until(lambda m: m.get("text") == "said once", timeout=30)
    bob.type("next line")
    alice.read_until(lambda m: m.get("text") == "next line", timeout=30)
    assert bob.finish() == 0
    assert len(said(alice, "said once")) == 1
    assert said(alice, "said once")[0] > 1000  # after the gap: sent again
    assert "cannot tell" not in bob.text("err") and "Traceback" not in bob.text("err")


def test_a_line_waiting_for_the_rate_limit_when_the_link_drops_is_sent_again(
        start_server, piped, open_client, request, tmp_path):
    # The server read the line but held it for want of a token (fake lag);
    # the drop discards it.  It must be sent again after the search (which
    # reaches bob's leave), not taken for said.  A gap with a hole needs
    # more lines than one slow sender can say, so alice talks from many
    # connections, each within its burst.
    server = start_server("--max-per-ip=200", "--history=5", "--history-replay=5",
                          "--msg-rate=0.5", "--msg-burst=30",
                          f"--db={tmp_path / 'room.db'}")
    relay, gate, bob, alice = bob_behind(server, b"held back", request, piped, open_client)
    for n in range(29):  # with bob's hello, his burst is spent
        bob.type(f"warm {n:02d}")
    bob.expect(rf"^{TIME} bob@127.0.0.1: warm 28$")
    bob.type("held back")
    assert relay.tripped.wait(20), "the client did not send the line"
    gate.set()
    alice.raw.send({"type": "ping", "token": "sync"})  # the server has had time to read it
    alice.read_until(lambda m: m.get("token") == "sync")
    relay.held = True
    relay.cut()
    bob.expect(RECONNECTING, key="err")
    alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    voices = []
    for v in range(40):
        voice = open_client(server.port)
        voice.join(f"v{v:02d}")
        for n in range(28):
            voice.send({"type": "say", "text": f"away {v:02d} {n:02d}"})
        voices.append(voice)
    alice.read_until(lambda m: m.get("text") == "away 39 27", timeout=30)
    assert not said(alice, "held back")
    relay.held = False
    bob.expect(HOLE_LINE, key="err", timeout=30)
    alice.read_until(lambda m: m.get("text") == "held back", timeout=30)
    assert bob.finish() == 0
    assert len(said(alice, "held back")) == 1
    assert "cannot tell" not in bob.text("err") and "Traceback" not in bob.text("err")


def test_a_line_whose_echo_is_replayed_under_the_old_address_is_not_said_twice(
        start_server, piped, open_client, request, tmp_path):
    # bob comes back from another address (a phone moving from Wi-Fi to
    # mobile data), so under another label; the echo of his line, replayed
    # in the gap, names the old one.  Before: it was compared with the new
    # label, not taken for the echo, and the line was said again.
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, gate, bob, alice = bob_behind(server, b"moved", request, piped, open_client)
    bob.type("moved")
    assert relay.tripped.wait(20), "the client did not send the line"
    relay.stalled = True
    gate.set()
    alice.read_until(lambda m: m.get("text") == "moved")
    relay.held = True
    relay.cut()
    relay.source = "127.0.0.2"
    busy_while_away(relay, bob, alice, count=3)
    bob.expect(r"^\* reconnected as bob@127.0.0.2 ")
    bob.expect(rf"^{TIME} bob@127.0.0.1: moved$")
    bob.type("next line")
    alice.read_until(lambda m: m.get("text") == "next line")
    assert bob.finish() == 0
    assert [(m["seq"], m["from"]) for m in alice.events if m.get("text") == "moved"] == [
        (3, "bob@127.0.0.1")]
    assert [m["from"] for m in alice.events if m.get("text") == "next line"] == [
        "bob@127.0.0.2"]


def test_slash_history_cut_off_by_a_drop_is_aimed_at_the_hole_once_back(
        start_server, piped, open_client, request, tmp_path):
    # /history is sent, and the link drops before its reply; meanwhile the
    # room says more than the fill fetches.  Once back, the request must be
    # aimed anew, at the hole (before: it went out unchanged, before the
    # oldest line shown before the drop, and said nothing earlier is kept).
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, _, bob, alice = bob_behind(server, b'"before"', request, piped, open_client,
                                      gated=False)
    bob.type("/history 30")
    assert relay.tripped.wait(20), "the client did not ask for history"
    busy_while_away(relay, bob, alice)
    hole = int(bob.expect(HOLE_LINE, key="err", timeout=30).group(1))
    bob.expect(rf"^\* /history shows more \({hole - 30} from while you were away not shown "
               r"yet\)$", timeout=20)
    assert bob.finish() == 0
    assert "nothing earlier is kept" not in bob.text()
    assert "Traceback" not in bob.text("err")


# --- the search's rules, with no I/O --------------------------------------------


def msg(seq: int, text: str = "x", sender: str = "a@h", ts: int = 1000) -> dict:
    return {"type": "message", "seq": seq, "from": sender, "text": text, "ts": ts}


def leave(seq: int, member: str = "b@h", ts: int = 1000) -> dict:
    return {"type": "leave", "seq": seq, "member": member, "reason": "hung_up", "ts": ts}


def is_echo(m: dict) -> bool:
    return m["type"] == "message" and m["from"] == "b@h" and m["text"] == "line"


def holed(holes, lost=()) -> transcript.Transcript:
    t = transcript.Transcript()
    t.holes, t.lost = list(holes), list(lost)
    return t


def search(upper: int = 5000, clock_ms: float | None = None, floor: int = 10) -> EchoSearch:
    found = EchoSearch(floor, "b@h", is_echo, restarts=0, dropped_at=100.0)
    found.begin(upper, clock_ms)
    return found


def answer(s: EchoSearch, frames: list[dict], events: list[dict]) -> None:
    """Feed the reply to ``frames`` (history, ping): header, events, pong."""
    history, ping = frames
    assert s.take({"type": "history", "before": history["before"], "count": len(events),
                   "more": True})
    for event in events:
        assert s.take(event)
    assert s.waiting
    assert s.take({"type": "pong", "token": ping["token"]})
    assert not s.waiting


def test_search_reads_the_hole_from_its_oldest_end_and_finds_the_echo():
    t = holed([(11, 700)])
    s = search()
    frames = s.requests(t)
    assert frames[0] == {"type": "history", "before": 211, "limit": 200}
    assert frames[1]["type"] == "ping"
    assert not s.take(msg(5000))  # not ours before the header
    answer(s, frames, [msg(seq) for seq in range(11, 211)])
    frames = s.requests(t)
    assert frames[0] == {"type": "history", "before": 411, "limit": 200}
    answer(s, frames, [msg(seq) for seq in range(211, 300)]
           + [msg(300, "line", "b@h")] + [msg(seq) for seq in range(301, 411)])
    assert s.requests(t) is None and s.verdict == FOUND


def test_search_stops_at_our_own_leave_at_the_time_bound_and_at_the_upper_bound():
    t = holed([(11, 700)])
    s = search()
    answer(s, s.requests(t), [msg(11), leave(12, "c@h"), leave(13)]
           + [msg(seq) for seq in range(14, 211)])
    assert s.requests(t) is None and s.verdict == ABSENT
    # Time: the drop was at 100 s on our clock; the server's is 1000 s ahead.
    s = search(clock_ms=1_000_000)
    cutoff = 1_100_000 + client_echo.GRACE_MS
    assert s.cutoff_ms == cutoff
    answer(s, s.requests(t), [msg(seq, ts=cutoff) for seq in range(11, 100)]
           + [msg(seq, ts=cutoff + 1) for seq in range(100, 211)])
    assert s.requests(t) is None and s.verdict == ABSENT
    # The welcome's last_seq bounds it: a hole above it is not searched.
    s = search(upper=150)
    frames = s.requests(t)
    assert frames[0] == {"type": "history", "before": 151, "limit": 140}
    answer(s, frames, [msg(seq) for seq in range(11, 151)])
    assert s.requests(t) is None and s.verdict == ABSENT


def test_search_skips_what_was_shown_and_walks_every_hole_above_the_floor():
    # Two drops: the first fill's hole, then its shown part, then the second's.
    t = holed([(2, 5), (11, 20), (31, 40)])
    s = search(floor=15)
    frames = s.requests(t)
    assert frames[0] == {"type": "history", "before": 21, "limit": 5}
    answer(s, frames, [msg(seq) for seq in range(16, 21)])
    frames = s.requests(t)
    assert frames[0] == {"type": "history", "before": 41, "limit": 10}
    answer(s, frames, [msg(seq) for seq in range(31, 41)])
    assert s.requests(t) is None and s.verdict == ABSENT
    assert search().requests(holed([])) is None  # no hole: nothing to read


@pytest.mark.parametrize("case", ["lost", "short", "empty", "epoch", "pages"])
def test_search_says_unknown_when_it_cannot_tell(case):
    t = holed([(11, 700)])
    s = search()
    if case == "lost":  # the fill found part of the gap gone
        t = holed([(31, 700)], lost=[(11, 30)])
    elif case == "short":  # retention dropped 11-49 meanwhile
        answer(s, s.requests(t), [msg(seq) for seq in range(50, 211)])
    elif case == "empty":
        answer(s, s.requests(t), [])
    elif case == "epoch":
        t.restarts += 1
    else:
        t, s = holed([(11, 100_000)]), search(upper=100_000)
        for _ in range(client_echo.MAX_PAGES):
            frames = s.requests(t)
            lo = frames[0]["before"] - frames[0]["limit"]
            answer(s, frames, [msg(seq) for seq in range(lo, frames[0]["before"])])
    assert s.requests(t) is None and s.verdict == UNKNOWN, case
    assert s.why


def test_search_finds_the_echo_past_a_page_cut_short_and_retries_a_page_refused():
    t = holed([(11, 700)])
    s = search()
    answer(s, s.requests(t), [msg(50), msg(51, "line", "b@h")])
    assert s.verdict == FOUND
    s = search()
    s.requests(t)
    assert s.take({"type": "error", "code": "room_unavailable", "message": "redis"})
    assert s.verdict == AGAIN and not s.waiting
    s.begin(9999, None)  # the next run: bounds kept, the page asked again
    assert s.upper == 5000
    assert s.requests(t)[0] == {"type": "history", "before": 211, "limit": 200}


def test_search_given_up_on_still_swallows_its_late_page():
    t = holed([(11, 700)])
    s = search()
    frames = s.requests(t)
    assert s.timed_out() == UNKNOWN and s.waiting
    # Late, the page must not reach the transcript as a /history page.
    answer(s, frames, [msg(11, "line", "b@h")])
    assert s.verdict == UNKNOWN and not s.take({"type": "pong", "token": "idle"})
