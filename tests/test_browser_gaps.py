"""Gaps longer than the server replays, in real headless Chromium through the
real gateway: after a reconnect whose `history after` reports `missed`, a
marker stands where the missed events belong and loads them with `history
before`, in place, until the page's transcript is a raw member's."""

from __future__ import annotations

import threading

import pytest
from browser_helpers import GatewayProcess, expect_, join, message_entry, room_entries
from conftest import ARTIFACTS

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

BACK = 20_000  # ms: reconnect backoff is capped at 15 s
REPLAY = 5  # --history and --history-replay: a gap of 30 is mostly missed


class Member:
    """A raw member that keeps every room event it is sent, from its own
    join on: the transcript the page must end up with."""

    def __init__(self, raw, name: str) -> None:
        self.raw = raw
        self.events: dict[int, dict] = {}
        raw.send({"type": "hello", "name": name})
        self.label = self.read_until(lambda m: m["type"] == "welcome")["label"]
        self.read_until(lambda m: m["type"] == "join" and m["member"] == self.label)

    def read_until(self, predicate, timeout: float = 10.0) -> dict:
        msg, seen = self.raw.recv_until(predicate, timeout)
        for m in [*seen, msg]:
            if "seq" in m:
                assert self.events.setdefault(m["seq"], m) == m
        return msg

    def say(self, *texts: str) -> None:
        for text in texts:
            self.raw.send({"type": "say", "text": text})
        self.read_until(lambda m: m["type"] == "message" and m["text"] == texts[-1])

    def entries(self) -> list[dict]:
        """Its events in the shape of browser_helpers.room_entries."""
        out = []
        for seq in sorted(self.events):
            m = self.events[seq]
            who = m["from"] if m["type"] == "message" else m["member"]
            out.append({"seq": seq, "kind": m["type"], "sender": who.split("@")[0],
                        "text": m["text"] if m["type"] == "message" else None})
        return out


def _page_entries(page) -> list[dict]:
    return [{**e, "text": e["text"] if e["kind"] == "message" else None}
            for e in room_entries(page)]


def _away(gateway, chat_port: int, start_gateway, alice, dave: Member, texts: list[str]):
    """Take the page's gateway down, have dave say ``texts`` meanwhile, and
    bring a gateway back on the same port; returns the new gateway once the
    page is back with its gap handled."""
    expect = expect_()
    joins = alice.locator("#transcript li.join.mine").count()
    gateway.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    dave.read_until(lambda m: m["type"] == "leave" and m["member"].startswith("alice@"))
    dave.say(*texts)
    back = start_gateway(chat_port, http_port=gateway.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    expect(alice.locator("#transcript li.join.mine")).to_have_count(joins + 1)
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    expect(alice.locator("#transcript")).to_have_attribute("aria-busy", "false")
    return back


def _away_through(relay, alice, dave: Member, count: int):
    """Cut the page's link at ``relay`` (a CuttingProxy), have dave say
    ``count`` lines meanwhile, and let the page back; returns its one gap
    marker once the page has handled the gap."""
    expect = expect_()
    relay.held = True
    relay.cut()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    dave.read_until(lambda m: m["type"] == "leave" and m["member"].startswith("alice@"))
    dave.say(*[f"away {n:03d}" for n in range(count)])
    relay.held = False
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    marker = alice.locator("#transcript li.gap-marker")
    expect(marker).to_have_count(1)
    expect(alice.locator("#transcript")).to_have_attribute("aria-busy", "false")
    return marker


def test_missed_events_are_loaded_in_place_at_their_markers(
        start_server, start_gateway, pages, open_client, tmp_path):
    expect = expect_()
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}",
                          f"--history={REPLAY}", f"--history-replay={REPLAY}",
                          "--msg-rate=1000", "--msg-burst=1000")
    dave = Member(open_client(server.port), "dave")  # seq 1
    dave.say(*[f"old {n}" for n in range(10)])  # seq 2-11
    gateway = start_gateway(server.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")  # seq 12, after a replay of 7-11
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    markers = alice.locator("#transcript li.gap-marker")

    # Two absences: 30 events missed (one page), then 250 (two pages).
    gateway = _away(gateway, server.port, start_gateway, alice, dave,
                    [f"away {n:02d}" for n in range(30)])
    expect(markers).to_have_count(1)
    dave.say("between")
    expect(message_entry(alice, "dave", "between")).to_have_count(1)
    _away(gateway, server.port, start_gateway, alice, dave,
          [f"long {n:03d}" for n in range(250)])
    expect(markers).to_have_count(2)

    # Each history after reported missed events: the markers stand for them,
    # exactly the seqs between what is shown above and below each.
    afters = [m for sent in pages.sent for m in sent if m["type"] == "history"]
    headers = [m for got in pages.received for m in got
               if m["type"] == "history" and "after" in m]
    assert [h["missed"] > 0 for h in headers] == [True, True], headers
    afters = [m for m in afters if "after" in m]
    assert [m["after"] for m in afters] == [h["after"] for h in headers]
    gaps = markers.evaluate_all(
        "els => els.map(e => [Number(e.dataset.after), Number(e.dataset.before)])")
    shown = [e["seq"] for e in room_entries(alice)]
    for after, before in gaps:
        assert after in shown and before in shown and not any(after < s < before for s in shown)
    (first_after, first_before), (second_after, second_before) = gaps
    assert first_after == 12  # alice's own join, the last she saw before the drop
    # Each sits in place: after the last event shown before the gap.
    for index, (after, _) in enumerate(gaps):
        assert markers.nth(index).evaluate(
            "e => { let p = e.previousElementSibling;"
            " while (p && !p.dataset.seq) p = p.previousElementSibling;"
            " return Number(p.dataset.seq); }") == after
    first_size = first_before - first_after - 1
    second_size = second_before - second_after - 1
    assert first_size >= 30 - REPLAY and second_size > 200
    expect(markers.nth(0).locator(".gap-text")).to_have_text(
        f"{first_size} earlier messages not shown \u2014")
    expect(markers.nth(0).locator("button")).to_have_text("Load")
    expect(markers.nth(1).locator(".gap-text")).to_have_text(
        f"{second_size} earlier messages not shown \u2014")

    markers.nth(0).scroll_into_view_if_needed()
    alice.screenshot(path=str(ARTIFACTS / "gap-marker.png"))

    # The newer gap first, with live messages arriving meanwhile.
    markers.nth(1).locator("button").click()
    dave.say(*[f"during {n}" for n in range(5)])
    expect(markers).to_have_count(1)
    expect(message_entry(alice, "dave", "during 4")).to_have_count(1)
    markers.nth(0).locator("button").click()
    expect(markers).to_have_count(0)
    # Scrolling back still reaches the beginning of the room.
    alice.locator("#transcript").evaluate("t => { t.scrollTop = 0; }")
    expect(alice.locator("#older")).to_have_attribute("data-state", "start")
    dave.say("end")
    expect(message_entry(alice, "dave", "end")).to_have_count(1)
    alice.wait_for_timeout(300)  # anything duplicated would arrive by now

    entries = _page_entries(alice)
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, seqs[-1] + 1)), "gap, duplicate or disorder"
    assert entries == dave.entries()
    # Gap pages of at most 200, newest first, each below the one before;
    # scrolling back (whenever the page found itself at the top) once.
    befores = [m for sent in pages.sent for m in sent
               if m["type"] == "history" and "before" in m]
    older = {"type": "history", "before": 7, "limit": 50}
    assert befores.count(older) == 1
    assert [m for m in befores if m != older] == [
        {"type": "history", "before": second_before, "limit": 200},
        {"type": "history", "before": second_before - 200, "limit": second_size - 200},
        {"type": "history", "before": first_before, "limit": first_size},
    ]
    problems = [p for p in pages.problems if "WebSocket" not in p and "ERR_CONNECTION" not in p]
    assert problems == []


def test_one_click_loads_at_most_a_thousand_and_the_marker_keeps_the_rest(
        start_server, start_gateway, pages, open_client, tmp_path):
    expect = expect_()
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}",
                          f"--history={REPLAY}", f"--history-replay={REPLAY}",
                          "--msg-rate=2000", "--msg-burst=2000")
    dave = Member(open_client(server.port), "dave")
    gateway = start_gateway(server.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    _away(gateway, server.port, start_gateway, alice, dave,
          [f"away {n:04d}" for n in range(1030)])
    marker = alice.locator("#transcript li.gap-marker")
    expect(marker).to_have_count(1)
    after, before = marker.evaluate(
        "e => [Number(e.dataset.after), Number(e.dataset.before)]")
    size = before - after - 1
    assert size > 1000

    marker.locator("button").click()
    expect(marker.locator(".gap-text")).to_have_text(
        f"{size - 1000} earlier messages not shown \u2014")
    expect(marker).to_have_attribute("data-state", "idle")
    befores = [m for sent in pages.sent for m in sent
               if m["type"] == "history" and "before" in m]
    assert befores == [{"type": "history", "before": before - 200 * n, "limit": 200}
                       for n in range(5)]
    marker.locator("button").click()
    expect(marker).to_have_count(0)
    dave.say("end")
    expect(message_entry(alice, "dave", "end")).to_have_count(1)
    alice.wait_for_timeout(300)  # anything duplicated would arrive by now
    entries = _page_entries(alice)
    assert entries == [e for e in dave.entries() if e["seq"] >= entries[0]["seq"]]
    assert [e["seq"] for e in entries] == list(range(entries[0]["seq"], entries[-1]["seq"] + 1))


def test_a_new_transcript_leaves_old_markers_inert(start_server, start_gateway, pages,
                                                   open_client, tmp_path):
    expect = expect_()
    options = ("--max-per-ip=200", f"--history={REPLAY}", f"--history-replay={REPLAY}",
               "--msg-rate=1000", "--msg-burst=1000")
    first = start_server(*options, f"--db={tmp_path / 'first.db'}")
    dave = Member(open_client(first.port), "dave")
    gateway = start_gateway(first.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    _away(gateway, first.port, start_gateway, alice, dave, [f"away {n:02d}" for n in range(30)])
    marker = alice.locator("#transcript li.gap-marker")
    expect(marker).to_have_count(1)
    size = marker.evaluate("e => Number(e.dataset.before) - Number(e.dataset.after) - 1")

    # Another database behind the same port: a new epoch, whose numbers
    # mean nothing for the old gap.
    first.kill()
    start_server(*options, f"--db={tmp_path / 'second.db'}", f"--port={first.port}")
    expect(alice.locator("#transcript li.new-transcript")).to_have_count(1, timeout=BACK)
    expect(marker).to_have_attribute("data-state", "stale")
    expect(marker.locator(".gap-text")).to_have_text(
        f"{size} earlier messages not shown (from the earlier transcript)")
    expect(marker.locator("button")).to_be_hidden()
    befores = [m for sent in pages.sent for m in sent
               if m["type"] == "history" and "before" in m and m["limit"] != 50]
    assert befores == []


def test_a_gap_page_cut_short_by_retention_ends_at_the_first_live_event(
        start_server, pages, open_client, tmp_path, request):
    # The server streams a page as the client drains it and skips what
    # retention drops meanwhile (PROTOCOL.md): the reply then holds fewer
    # events than its header's count.  The page ends it at the first live
    # event and says what is gone, instead of showing "Loading" until its
    # request times out and dropping what came.
    from test_client_gap_faults import CuttingProxy

    expect = expect_()
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}",
                          f"--history={REPLAY}", f"--history-replay={REPLAY}",
                          "--retain-events=950", "--slow-reader-bytes=67108864",
                          "--msg-rate=2000", "--msg-burst=2000")
    # The page's link to the chat server goes through a relay that can stop
    # reading from the server, so the server's output to it backs up.
    relay = CuttingProxy(server.port, b"never")
    request.addfinalizer(relay.close)
    gateway = GatewayProcess(tmp_path, relay.port, 0, "--queue-size=100000")
    request.addfinalizer(gateway.kill)
    dave = Member(open_client(server.port), "dave")
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    marker = _away_through(relay, alice, dave, 300)

    relay.stalled = True
    for n in range(600):  # about 10 MB: more than the sockets between take
        dave.raw.send({"type": "say", "text": f"big {n:03d} " + "\U0001F600" * 3900})
    dave.read_until(lambda m: m.get("text", "").startswith("big 599 "), timeout=30)
    marker.locator("button").click()  # the page is asked for; its events wait
    dave.raw.send({"type": "ping", "token": "asked"})
    dave.read_until(lambda m: m.get("token") == "asked")
    dave.say(*[f"on {n:03d}" for n in range(400)])  # the page's events pass retention
    relay.stalled = False
    expect(message_entry(alice, "dave", "on 399")).to_have_count(1, timeout=60_000)
    expect(marker).to_have_attribute("data-state", "gone")
    expect(marker.locator(".gap-text")).to_contain_text("no longer kept by the server")
    entries = _page_entries(alice)
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(set(seqs))
    assert entries == [e for e in dave.entries() if e["seq"] in set(seqs)]


def test_scrolling_back_while_a_gap_loads_follows_the_gap_page(
        start_server, pages, open_client, tmp_path, request):
    # "Show earlier messages" asked while a gap's page is due: it used to be
    # dropped (one request at a time), leaving a button that did nothing.
    from test_client_gap_faults import CuttingProxy

    expect = expect_()
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}",
                          f"--history={REPLAY}", f"--history-replay={REPLAY}",
                          "--msg-rate=1000", "--msg-burst=1000")
    gate = threading.Event()
    relay = CuttingProxy(server.port, b'"limit":200', gate)  # holds the gap's first page
    request.addfinalizer(gate.set)
    request.addfinalizer(relay.close)
    gateway = GatewayProcess(tmp_path, relay.port)
    request.addfinalizer(gateway.kill)
    dave = Member(open_client(server.port), "dave")  # seq 1
    dave.say(*[f"old {n}" for n in range(10)])  # 2-11: the page shows 7-11 and the rest is older
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave.read_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    marker = _away_through(relay, alice, dave, 250)
    marker.locator("button").click()
    assert relay.tripped.wait(10), "the gap's page was not asked for"
    alice.locator("#older .older-button").click()  # while the gap's page is due
    expect(alice.locator("#older")).to_have_attribute("data-state", "loading")
    gate.set()
    expect(message_entry(alice, "dave", "old 0")).to_have_count(1)
    expect(alice.locator("#older")).to_have_attribute("data-state", "start")
    expect(marker).to_have_count(0)
    seqs = [e["seq"] for e in _page_entries(alice)]
    assert seqs == list(range(1, seqs[-1] + 1))
