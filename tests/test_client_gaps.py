"""The terminal client after a gap longer than the server replays: the
missed events are fetched with ``history before`` and shown once, in order
(up to transcript.GAP_FILL); a longer gap is counted and ``/history``
shows the rest.  A real server subprocess, the client as a piped
subprocess, and the relay of test_client_resume to cut its link."""

from __future__ import annotations

import re

import pytest
from test_client_resume import RECONNECTING, TIME, Proxy

from tcpserver import display, transcript

REPLAY = 5  # --history and --history-replay: most of a gap is missed
SERVER = ("--max-per-ip=200", f"--history={REPLAY}", f"--history-replay={REPLAY}",
          "--msg-rate=2000", "--msg-burst=2000")


@pytest.fixture
def link(request):
    """Factory: ``link(server_port) -> Proxy``, closed at teardown."""

    def make(port: int) -> Proxy:
        made = Proxy(port)
        request.addfinalizer(made.close)
        return made

    return make


class Member:
    """A raw member that keeps every room event it reads, from its join on."""

    def __init__(self, raw, name: str) -> None:
        self.raw = raw
        self.events: list[dict] = []
        raw.send({"type": "hello", "name": name})

    def read_until(self, predicate, timeout: float = 20.0) -> None:
        msg, seen = self.raw.recv_until(predicate, timeout)
        self.events += [m for m in [*seen, msg] if "seq" in m]

    def say(self, text: str) -> None:
        self.raw.send({"type": "say", "text": text})

    def transcript(self, last_text: str) -> dict[int, str]:
        """Its events up to ``last_text``, each as bob's client shows it."""
        self.read_until(lambda m: m.get("text") == last_text)
        assert self.events == sorted(self.events, key=lambda m: m["seq"])
        return {m["seq"]: display.room_event(m, False) for m in self.events}


def away(link: Proxy, bob, alice: Member, texts: list[str]) -> None:
    """Cut bob's link and keep it down while alice says ``texts``."""
    link.held = True
    link.cut()
    bob.expect(RECONNECTING, key="err")
    alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    for text in texts:
        alice.say(text)
    alice.read_until(lambda m: m.get("text") == texts[-1])
    link.held = False


def room_lines(text: str) -> list[str]:
    return re.findall(rf"^{TIME} .*$", text, re.M)


def test_missed_events_beyond_the_replay_are_fetched_and_shown_once_in_order(
        start_server, link, piped, open_client, tmp_path):
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay = link(server.port)
    bob = piped(relay.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = Member(open_client(server.port), "alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    away(relay, bob, alice, [f"away {n:02d}" for n in range(30)])
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    alice.say("back")
    bob.expect(rf"^{TIME} alice@127.0.0.1: back$")
    assert bob.finish() == 0

    # Bob's lines are alice's transcript (her welcome replayed bob's join),
    # each once, in order, then his own leave; no gap is told of, for
    # nothing is missing.
    seen = alice.transcript("back")
    assert room_lines(bob.text())[:-1] == [seen[seq] for seq in sorted(seen)], bob.text()
    assert "(history)" not in bob.text()
    assert "from while you were away" not in bob.text("err"), bob.text("err")
    assert "Traceback" not in bob.text("err")


def test_a_gap_longer_than_the_fill_is_counted_and_history_shows_the_rest(
        start_server, link, piped, open_client, tmp_path):
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay = link(server.port)
    bob = piped(relay.port, "bob")  # seq 1
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = Member(open_client(server.port), "alice")  # seq 2
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    # Bob's hang-up (3), then 1050 lines (4-1053); his join is 1054.
    count = transcript.GAP_FILL + 50
    away(relay, bob, alice, [f"away {n:04d}" for n in range(count)])
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    alice.say("back")
    bob.expect(rf"^{TIME} alice@127.0.0.1: back$", timeout=20)
    # The reply after 2 replays 1050-1054 and misses 3-1049; the welcome
    # replayed 1049-1053; 1000 are fetched (49-1048) and 3-48 stay out.
    hole = 46
    bob.expect(rf"^! {hole} earlier events from while you were away are not shown "
               r"\(/history shows them\)$", key="err")
    bob.type("/history 30")
    bob.expect(rf"^\* /history shows more \({hole - 30} from while you were away not "
               r"shown yet\)$")
    bob.type("/history")
    bob.expect(r"^\* that closes the gap$")
    bob.type("/history 5")
    bob.expect(r"^\* nothing earlier is kept$")
    assert bob.finish() == 0

    seen = alice.transcript("back")
    out = bob.text()
    live = [line for line in room_lines(out) if "(history)" not in line][:-1]
    assert live == [seen[seq] for seq in sorted(seen) if seq <= 2 or seq > 2 + hole], out
    blocks = out[out.index("* 30 events from while you were away:"):]
    assert re.findall(r"^\* \d+ events from while you were away:$", blocks, re.M) == [
        "* 30 events from while you were away:", f"* {hole - 30} events from while you were "
        "away:"]
    history = [line.replace(" (history)", "") for line in room_lines(blocks)
               if "(history)" in line]
    # Newest first by page, each page in order: 19-48, then 3-18.
    assert history == [seen[seq] for seq in range(3 + hole - 30, 3 + hole)] + [
        seen[seq] for seq in range(3, 3 + hole - 30)], blocks
    assert "Traceback" not in bob.text("err")


def test_slash_history_typed_before_the_fill_is_done_starts_with_the_gap(
        start_server, link, piped, open_client, tmp_path):
    # A piped /history read while the client is still away (or filling):
    # it must go out once the fill is done, and so start with the gap the
    # fill left (before: it was aimed at the oldest line shown before the
    # drop, and said nothing earlier is kept).
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay = link(server.port)
    bob = piped(relay.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = Member(open_client(server.port), "alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    relay.held = True
    relay.cut()
    bob.expect(RECONNECTING, key="err")
    bob.type("/history 30")
    alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    for n in range(transcript.GAP_FILL + 50):
        alice.say(f"away {n:04d}")
    alice.read_until(lambda m: m.get("text") == f"away {transcript.GAP_FILL + 49:04d}")
    relay.held = False
    bob.expect(r"^! 46 earlier events from while you were away are not shown "
               r"\(/history shows them\)$", key="err", timeout=20)
    bob.expect(r"^\* /history shows more \(16 from while you were away not shown yet\)$")
    assert bob.finish() == 0
    assert "nothing earlier is kept" not in bob.text()


# --- the rules, with no I/O --------------------------------------------------------


def message(seq: int) -> dict:
    return {"type": "message", "seq": seq, "from": "a@h", "text": f"m{seq}", "ts": 0}


def welcome(last_seq: int) -> dict:
    return {"type": "welcome", "name": "b", "label": "b@h", "epoch": "e1",
            "last_seq": last_seq, "members": [], "more": False, "history": 0}


def shown(lines) -> list[int]:
    return [int(line.text.rsplit(": m", 1)[1]) for line in lines if ": m" in line.text]


def rejoined(last_seq: int, missed: int) -> transcript.Transcript:
    """A transcript that showed seq 1, rejoined at ``last_seq`` and took
    the ``history after 1`` reply: ``missed`` skipped, then the 5 replayed
    events ending at ``last_seq``."""
    t = transcript.Transcript()
    t.welcome(welcome(0), rejoin=False)
    t.event(message(1))
    t.welcome(welcome(last_seq), rejoin=True)
    t.history({"type": "history", "after": 1, "count": 5, "missed": missed})
    for seq in range(last_seq - 4, last_seq + 1):
        t.event(message(seq))
    return t


def test_transcript_fetches_the_missed_in_pages_and_leaves_a_hole_past_the_bound():
    t = transcript.Transcript()
    t.welcome(welcome(0), rejoin=False)
    assert shown(t.event(message(1))) == [1]
    _, request = t.welcome(welcome(1500), rejoin=True)
    assert request == {"type": "history", "after": 1}
    # The reply replays 1496-1500 and misses 2-1495.
    assert t.history({"type": "history", "after": 1, "count": 5, "missed": 1494}) == []
    for seq in range(1496, 1501):
        assert t.event(message(seq)) == []
    lines = []
    for before in (1496, 1296, 1096, 896, 696):
        assert t.filling
        assert t.take_requests() == [{"type": "history", "before": before, "limit": 200}]
        # Live before the reply's header: held, not counted (the server
        # sends no room event inside a reply).
        assert t.event(message(1501)) == []
        assert t.history({"type": "history", "before": before, "count": 200,
                          "more": True}) == []
        for seq in range(before - 200, before):
            lines += t.event(message(seq))
    assert not t.filling and t.take_requests() == []
    assert lines[0].err and lines[0].text == (
        "! 494 earlier events from while you were away are not shown (/history shows them)")
    assert shown(lines) == list(range(496, 1502))
    assert t.holes == [(2, 495)]
    # /history takes the hole first, newest events first.
    assert t.older(20) == {"type": "history", "before": 496, "limit": 20}
    t.history({"type": "history", "before": 496, "count": 20, "more": True})
    page = []
    for seq in range(476, 496):
        page += t.event(message(seq))
    assert page[0].text == "* 20 events from while you were away:"
    assert page[-1].text == "* /history shows more (474 from while you were away not shown yet)"
    assert t.holes == [(2, 475)] and t.oldest_seq == 1


def test_transcript_counts_what_the_server_no_longer_keeps():
    t = rejoined(21, 15)
    assert t.take_requests() == [{"type": "history", "before": 17, "limit": 15}]
    # Retention kept 10-16 only.
    t.history({"type": "history", "before": 17, "count": 7, "more": False})
    lines = []
    for seq in range(10, 17):
        lines += t.event(message(seq))
    assert lines[0].text == "! 8 events from while you were away are no longer kept by the server"
    assert shown(lines) == list(range(10, 22)) and t.holes == [] and not t.filling


@pytest.mark.parametrize("header", [False, True])
def test_transcript_a_new_epoch_in_the_middle_of_a_fill_drops_what_was_held(header):
    t = transcript.Transcript()
    t.welcome(welcome(0), rejoin=False)
    t.event(message(1))
    t.welcome(welcome(1500), rejoin=True)
    if header:  # the after reply came and the missed were being fetched
        t.history({"type": "history", "after": 1, "count": 5, "missed": 1494})
        for seq in range(1496, 1501):
            t.event(message(seq))
        assert t.take_requests()
    assert t.filling
    lines, request = t.welcome({**welcome(3), "epoch": "e2"}, rejoin=True)
    assert request is None and lines[0].text == transcript.NEW_EPOCH
    assert not t.filling and t.take_requests() == []
    assert shown([line for seq in (1, 2, 3) for line in t.event(message(seq))]) == [1, 2, 3]


def test_transcript_a_gap_page_refused_leaves_a_hole_and_shows_what_is_held():
    t = transcript.Transcript()
    t.welcome(welcome(0), rejoin=False)
    t.event(message(1))
    t.welcome(welcome(40), rejoin=True)
    assert t.unavailable() == []  # no page asked yet: not ours
    t.history({"type": "history", "after": 1, "count": 5, "missed": 34})
    for seq in range(36, 41):
        t.event(message(seq))
    assert t.take_requests() == [{"type": "history", "before": 36, "limit": 34}]
    lines = t.unavailable()
    assert lines[0].text == ("! 34 earlier events from while you were away are not shown "
                             "(/history shows them)")
    assert shown(lines) == list(range(36, 41)) and not t.filling
    assert t.holes == [(2, 35)]
    assert t.older(200) == {"type": "history", "before": 36, "limit": 34}


def test_transcript_a_page_cut_short_ends_at_the_first_live_event():
    t = rejoined(300, 294)
    assert t.take_requests() == [{"type": "history", "before": 296, "limit": 200}]
    # 96-110 came, then retention dropped 111-200 while the rest was sent.
    t.history({"type": "history", "before": 296, "count": 200, "more": True})
    for seq in [*range(96, 111), *range(201, 296)]:
        assert t.event(message(seq)) == []
    assert t.event(message(301)) == [] and t.filling  # the page is over: ask below 201
    assert t.take_requests() == [{"type": "history", "before": 201, "limit": 199}]
    lines = t.history({"type": "history", "before": 201, "count": 0, "more": False})
    assert not t.filling
    assert lines[0].text == "! 199 events from while you were away are no longer kept by the server"
    # What came below the break is not shown under a hole it belongs in.
    assert shown(lines) == list(range(201, 302))


def test_transcript_a_history_page_cut_short_keeps_its_unbroken_top():
    t = transcript.Transcript()
    t.welcome(welcome(100), rejoin=False)
    t.event(message(101))
    assert t.older(50) == {"type": "history", "before": 101, "limit": 50}
    t.history({"type": "history", "before": 101, "count": 50, "more": True})
    lines = []
    for seq in [51, 52, *range(80, 101), 102]:
        lines += t.event(message(seq))
    assert lines[0].text == "* 21 earlier events:"
    assert shown(lines) == [*range(80, 101), 102] and t.oldest_seq == 80


def test_transcript_a_gap_one_past_the_fill_is_one_event_in_the_singular():
    t = rejoined(1007, 1001)
    lines = []
    while t.filling:
        (request,) = t.take_requests()
        before, limit = request["before"], request["limit"]
        t.history({"type": "history", "before": before, "count": limit, "more": True})
        for seq in range(before - limit, before):
            lines += t.event(message(seq))
    assert [line.text for line in lines if line.err] == [
        "! 1 earlier event from while you were away is not shown (/history shows them)"]
    assert t.holes == [(2, 2)]
