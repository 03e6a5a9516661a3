"""The page in real headless Chromium, through the real gateway, against the
real chat server, with terminal clients and raw clients in the same room."""

from __future__ import annotations

import re
import struct
import time

import pytest
from browser_helpers import (
    DESKTOP,
    PHONE,
    expect_,
    join,
    member_names,
    message_entry,
    notice_entry,
    room_entries,
    say,
)
from conftest import ARTIFACTS

# The browser, pages, start_gateway and gateway fixtures.
pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser


def test_two_pages_and_a_terminal_chat_in_one_room(server, gateway, pages, piped):
    expect = expect_()
    alice = pages.open(gateway.url)
    bob = pages.open(gateway.url)
    join(alice, "alice")
    join(bob, "bob")
    expect(notice_entry(alice, "join", "bob")).to_have_count(1)

    carol = piped(server.port, "carol")
    carol.expect(r"^\* joined as carol@")
    for page in (alice, bob):
        expect(notice_entry(page, "join", "carol")).to_have_count(1)

    carol.type("hello from the terminal")
    carol.expect(r"carol@\S+: hello from the terminal$")
    say(alice, "hello from alice")
    say(bob, "and from bob")
    for page in (alice, bob):
        expect(message_entry(page, "carol", "hello from the terminal")).to_have_count(1)
        expect(message_entry(page, "alice", "hello from alice")).to_have_count(1)
        expect(message_entry(page, "bob", "and from bob")).to_have_count(1)
    carol.expect(r"\] alice@\S+: hello from alice$")
    carol.expect(r"\] bob@\S+: and from bob$")

    # Own messages are marked, for the eye and for a screen reader.
    mine = message_entry(alice, "alice", "hello from alice")
    expect(mine).to_have_class(re.compile(r"\bmine\b"))
    expect(mine.locator(".visually-hidden")).to_have_text("(your message)")
    expect(message_entry(alice, "bob", "and from bob")).not_to_have_class(re.compile(r"\bmine\b"))

    # All three see one transcript, in the same order.
    carol_order = [line.split(": ", 1)[1] for line in carol.lines["out"]
                   if re.search(r"\] \w+@\S+: ", line)]
    for page in (alice, bob):
        texts = [e["text"] for e in room_entries(page) if e["kind"] == "message"]
        assert texts == carol_order == [
            "hello from the terminal", "hello from alice", "and from bob"]

    # Leaves: a page that leaves, and a terminal whose input ends.
    bob.click("#leave-button")
    expect(bob.locator("#status")).to_have_attribute("data-state", "offline")
    expect(bob.locator("#join-form")).to_be_visible()
    expect(notice_entry(alice, "leave", "bob")).to_have_text(re.compile(r"bob\s+left$"))
    carol.expect(r"\* bob@\S+ left$")
    assert carol.finish() == 0
    expect(notice_entry(alice, "leave", "carol")).to_have_count(1)
    assert pages.problems == []


def test_private_messages_by_member_click_and_slash_msg(server, gateway, pages, piped,
                                                        connect):
    expect = expect_()
    alice = pages.open(gateway.url)
    bob = pages.open(gateway.url)
    join(alice, "alice")
    join(bob, "bob")
    carol = piped(server.port, "carol")
    carol.expect(r"^\* joined as carol@")
    expect(alice.locator("#member-list button.member-body")).to_have_count(2)

    # Click a member, type, Enter: only that member gets it.
    alice.locator("#member-list button.member-body", has_text="carol").click()
    expect(alice.locator("#compose-text")).to_be_focused()
    expect(alice.locator("#compose-to option:checked")).to_have_text("carol")
    say(alice, "psst carol")
    carol.expect(r"\(private\) alice@\S+ -> you: psst carol$")
    echo = alice.locator("#transcript li.private.mine")
    expect(echo).to_have_count(1)
    expect(echo).to_contain_text("to carol")
    expect(echo.locator(".text")).to_have_text("psst carol")

    # /msg works from the box, and the chosen recipient does not matter.
    say(alice, "/msg bob just for bob")
    got = bob.locator("#transcript li.private")
    expect(got).to_have_count(1)
    expect(got).to_contain_text("from alice")
    expect(got.locator(".text")).to_have_text("just for bob")
    expect(got).not_to_have_class(re.compile(r"\bmine\b"))

    # Unknown recipients come back as an error beside the box.
    say(alice, "/msg nobody hello?")
    expect(alice.locator("#compose-error")).to_have_text("No one by that name is here.")

    # Private messages are not room events: nobody else saw them.
    a_witness = connect("dave")
    say(bob, "public again")
    msg, before = a_witness.recv_until(lambda m: m.get("text") == "public again")
    assert all(m["type"] != "private" for m in before)
    assert bob.locator("#transcript li.private").count() == 1
    assert "just for bob" not in carol.text()
    assert pages.problems == []


def test_markup_in_a_message_is_shown_as_text(server, gateway, pages, connect):
    expect = expect_()
    payload = "<img src=x onerror=alert(1)>"
    script = "<script>alert(2)</script><b>bold</b>"
    alice = pages.open(gateway.url)
    join(alice, "alice")
    mallory = connect("mallory")
    mallory.send({"type": "say", "text": payload})
    say(alice, script)

    expect(message_entry(alice, "mallory", payload)).to_have_count(1)
    expect(message_entry(alice, "alice", script)).to_have_count(1)
    alice.wait_for_timeout(300)  # room for an onerror handler to fire, if one existed
    assert alice.locator("img").count() == 0
    assert alice.locator("#transcript script, #transcript b").count() == 0
    texts = alice.locator("#transcript li.message .text").all_text_contents()
    assert sorted(texts) == sorted([payload, script])
    assert pages.dialogs == []


# Each has nothing visible: whitespace, format characters (Cf),
# default-ignorable code points and blank fillers, alone and mixed.
INVISIBLE_TEXTS = [
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u3164", "\u2800", "\u00ad",
    "\uffa0", "\u115f\u1160", "\u180e", "\u034f", "\U000e0020", "\u202e\u2066",
    "  \u200b \u3000\u2800 ", "\u00a0\u200d\t",
]


def test_a_message_with_nothing_visible_is_refused_before_sending(server, gateway, pages,
                                                                   connect):
    expect = expect_()
    alice = pages.open(gateway.url)
    join(alice, "alice")
    bob = connect("bob")
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "bob"])
    box = alice.locator("#compose-text")
    error = alice.locator("#compose-error")
    for text in INVISIBLE_TEXTS:
        for typed in (text, "/msg bob " + text):
            box.fill(typed)
            box.press("Enter")
            expect(error).to_have_text("Nothing visible to send: add some text.")
            expect(box).to_have_value(typed)  # kept, to be fixed or cleared
            alice.evaluate("document.getElementById('compose-error').textContent = ''")
    # A private message to a chosen member follows the same rule.
    alice.locator("#member-list button.member-body", has_text="bob").click()
    box.fill("\u200b\u200b")
    box.press("Enter")
    expect(error).to_have_text("Nothing visible to send: add some text.")
    alice.select_option("#compose-to", "")

    # Visible text that carries invisible characters inside it still goes.
    joined = "\U0001f469\u200d\U0001f4bb ok\u00ad"
    say(alice, joined)
    expect(error).to_have_text("")
    expect(message_entry(alice, "alice", joined)).to_have_count(1)
    assert bob.recv_type("message")["text"] == joined
    assert [m["type"] for m in pages.sent[0]] == ["hello", "say"]
    assert pages.problems == []


def test_member_list_follows_joins_and_leaves(server, gateway, pages, connect):
    expect = expect_()
    alice = pages.open(gateway.url)
    join(alice, "alice")
    assert member_names(alice) == ["alice"]
    expect(alice.locator("#member-count")).to_have_text("1")

    bob = connect("bob")
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "bob"])
    carol = pages.open(gateway.url)
    join(carol, "carol")
    # The newcomer's list comes from its welcome, ours from the join event.
    expect(carol.locator("#member-list .member-name")).to_have_text(["carol", "alice", "bob"])
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "bob", "carol"])
    expect(alice.locator("#member-count")).to_have_text("3")
    expect(alice.locator("#compose-to option")).to_have_text(["Everyone", "bob", "carol"])

    bob.send({"type": "quit"})
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "carol"])
    expect(carol.locator("#member-list .member-name")).to_have_text(["carol", "alice"])
    carol.click("#leave-button")
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice"])
    expect(alice.locator("#member-count")).to_have_text("1")
    expect(alice.locator("#compose-to option")).to_have_text(["Everyone"])
    leave = notice_entry(alice, "leave", "carol")
    expect(leave).to_have_count(1)
    assert pages.problems == []


# The page sends quit on pagehide, but a send made while a page goes away
# does not always get out (a browser may close the socket first): so with
# its quit dropped too, the close frame alone (1001) must say "left".
@pytest.mark.parametrize("how, page_quit", [("close", True), ("close", False),
                                            ("navigate", False)])
def test_closing_the_tab_or_leaving_the_page_reads_as_left(server, gateway, pages, connect,
                                                           how, page_quit):
    alice = pages.open(gateway.url)
    if not page_quit:
        alice.add_init_script("""(function () {
          var send = WebSocket.prototype.send;
          WebSocket.prototype.send = function (data) {
            if (JSON.parse(data).type !== "quit") { return send.call(this, data); }
          };
        }());""")
        alice.reload()
    join(alice, "alice")
    bob = connect("bob")
    if how == "close":
        alice.close()
    else:
        alice.goto("about:blank")
    left, _ = bob.recv_until(lambda m: m["type"] == "leave", timeout=10)
    assert (left["member"].split("@")[0], left["reason"]) == ("alice", "quit")
    assert not any(m["type"] == "quit" for sent in pages.sent for m in sent) or page_quit


def test_member_list_is_collected_across_chunked_frames(start_server, start_gateway, pages,
                                                        open_client):
    expect = expect_()
    # 1 KiB frames hold about 11 long labels, so 25 members take 3 frames.
    server = start_server("--max-per-ip=200", "--max-frame=1024")
    gateway = start_gateway(server.port)
    names = [f"member-{n:02d}-" + "x" * 22 for n in range(24)]
    for name in names:
        open_client(server.port, name)
    page = pages.open(gateway.url)
    join(page, "alice")
    expected = ["alice"] + sorted(names)
    expect(page.locator("#member-list .member-name")).to_have_text(expected)
    say(page, "/who")  # a members reply replaces the list, never adds to it
    page.wait_for_timeout(300)
    expect(page.locator("#member-list .member-name")).to_have_text(expected)
    expect(page.locator("#member-count")).to_have_text("25")
    assert [m["type"] for m in pages.sent[0]] == ["hello", "who"]
    chunks = [m for m in pages.received[0] if m["type"] in ("welcome", "members")]
    assert [m["more"] for m in chunks] == [True, True, False, True, True, False]


def test_name_errors_show_beside_the_form_and_a_retry_works(server, gateway, pages, connect):
    expect = expect_()
    connect("bob")
    page = pages.open(gateway.url)
    expect(page.locator("#join-name")).to_be_focused()

    page.fill("#join-name", "Bob")  # taken, ignoring case
    page.press("#join-name", "Enter")
    expect(page.locator("#join-error")).to_have_text(
        "The name \u201cBob\u201d is taken. Try another.")
    expect(page.locator("#join-name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#join-form")).to_be_visible()

    page.fill("#join-name", "not a name!")
    page.press("#join-name", "Enter")
    expect(page.locator("#join-error")).to_have_text(re.compile("letters, digits"))

    join(page, "robert")
    expect(page.locator("#join-error")).to_be_hidden()
    # The refused hello and the accepted one went over the same WebSocket.
    assert pages.sockets == [gateway.url.replace("http:", "ws:") + "ws"]
    expect(page.locator("#status-text")).to_have_text("Connected as robert")
    # Keyboard only: focus is in the message box and Enter sends.
    expect(page.locator("#compose-text")).to_be_focused()
    page.keyboard.type("typed, not clicked")
    page.keyboard.press("Enter")
    expect(message_entry(page, "robert", "typed, not clicked")).to_have_count(1)
    assert pages.problems == []


def test_page_answers_the_servers_ping(start_server, start_gateway, pages):
    expect = expect_()
    # Silent for 1 s draws a ping; silent for 2 s is a disconnect.
    server = start_server("--idle-timeout=2")
    gateway = start_gateway(server.port)
    page = pages.open(gateway.url)
    join(page, "alice")
    server.wait_log(r"alice@\S+ joined")
    page.wait_for_timeout(5000)  # several idle timeouts, every one answered
    assert "idle_timeout" not in server.log_text()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert page.locator("#transcript li.leave").count() == 0
    assert len(pages.sockets) == 1
    assert pages.problems == []


def _room_log(client, until_text: str) -> list[dict]:
    """Room events a raw client reads up to the message ``until_text``."""
    msg, before = client.recv_until(lambda m: m.get("text") == until_text, timeout=10)
    return [m for m in before + [msg] if m["type"] in ("message", "join", "leave")]


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_reconnect_after_gateway_restart_has_no_gap_and_no_duplicate(
        stop, server, start_gateway, pages, connect):
    expect = expect_()
    first = start_gateway(server.port)
    alice = pages.open(first.url)
    join(alice, "alice")
    dave = connect("dave")
    seen = []  # every room event dave receives, in order
    for text in ("before 1", "before 2"):
        dave.send({"type": "say", "text": text})
        seen += _room_log(dave, text)
    expect(message_entry(alice, "dave", "before 2")).to_have_count(1)
    last_seen = room_entries(alice)[-1]["seq"]

    if stop == "kill":
        first.kill()
    else:
        assert first.terminate() == 0
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    # The room goes on without her.
    for text in ("while away 1", "while away 2", "while away 3"):
        dave.send({"type": "say", "text": text})
        seen += _room_log(dave, text)
    assert any(m["type"] == "leave" and m["member"].startswith("alice@") for m in seen)

    start_gateway(server.port, http_port=first.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=20_000)
    dave.send({"type": "say", "text": "after"})
    seen += _room_log(dave, "after")
    expect(message_entry(alice, "dave", "after")).to_have_count(1)
    alice.wait_for_timeout(300)  # anything duplicated would arrive by now

    entries = room_entries(alice)
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, seqs[-1] + 1)), "gap or duplicate in the transcript"
    texts = [e["text"] for e in entries if e["kind"] == "message"]
    assert texts == ["before 1", "before 2", "while away 1", "while away 2",
                     "while away 3", "after"]
    # Every event dave saw since he joined is there, under the same seq.
    page_by_seq = {e["seq"]: e for e in entries}
    for event in seen:
        entry = page_by_seq[event["seq"]]
        assert entry["kind"] == event["type"]
        if event["type"] == "message":
            assert entry["text"] == event["text"]
    assert seqs[-1] == seen[-1]["seq"]
    # She left (her link died) and came back as the same name.
    assert [e["kind"] for e in entries if e["sender"] == "alice"] == ["join", "leave", "join"]
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "dave"])
    # The second socket said hello again, with the first welcome's resume
    # token, then asked for what it missed.
    assert pages.sent[0][0] == {"type": "hello", "name": "alice"}
    token = pages.received[0][0]["resume"]
    assert pages.sent[-1][:2] == [{"type": "hello", "name": "alice", "resume": token},
                                  {"type": "history", "after": last_seen}]
    unexpected = [p for p in pages.problems if "WebSocket" not in p and "ERR_CONNECTION" not in p]
    assert unexpected == []


def test_a_gap_the_server_no_longer_keeps_is_marked_as_lost_in_place(
        start_server, start_gateway, pages, open_client):
    expect = expect_()
    # Only a log held in memory forgets: it keeps the last --history events.
    server = start_server("--max-per-ip=200", "--history=3", "--db=:memory:")
    first = start_gateway(server.port)
    alice = pages.open(first.url)
    join(alice, "alice")
    dave = open_client(server.port, "dave")
    dave.send({"type": "say", "text": "seen"})
    expect(message_entry(alice, "dave", "seen")).to_have_count(1)
    first.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    for n in range(6):
        dave.send({"type": "say", "text": f"gone {n}"})
        _room_log(dave, f"gone {n}")
    start_gateway(server.port, http_port=first.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=20_000)
    dave.send({"type": "say", "text": "back"})
    expect(message_entry(alice, "dave", "back")).to_have_count(1)
    alice.wait_for_timeout(300)

    seqs = [e["seq"] for e in room_entries(alice)]
    assert seqs == sorted(set(seqs)), "duplicate or out of order"
    texts = [e["text"] for e in room_entries(alice) if e["kind"] == "message"]
    # Her welcome replayed the 3 newest events (gone 3-5); the 4 before them
    # (her own leave, gone 0-2) were not replayed: a marker stands in place.
    assert texts == ["seen", "gone 3", "gone 4", "gone 5", "back"]
    marker = alice.locator("#transcript li.gap-marker")
    expect(marker).to_have_count(1)
    expect(marker.locator(".gap-text")).to_have_text("4 earlier messages not shown \u2014")
    assert alice.eval_on_selector(
        "#transcript li.gap-marker + li", "e => e.textContent").endswith("gone 3")
    # Asked for, they are gone from the log: the marker says so and stays.
    marker.locator("button").click()
    expect(marker).to_have_attribute("data-state", "gone")
    expect(marker.locator(".gap-text")).to_have_text(
        "4 earlier messages are no longer kept by the server")
    expect(marker.locator("button")).to_be_hidden()
    gone_3 = message_entry(alice, "dave", "gone 3").get_attribute("data-seq")
    assert pages.sent[-1][-1] == {"type": "history", "before": int(gone_3), "limit": 4}
    assert [e["text"] for e in room_entries(alice) if e["kind"] == "message"] == texts


def test_reconnect_to_a_restarted_chat_server_starts_a_new_transcript(
        start_server, start_gateway, pages, open_client):
    expect = expect_()
    old_server = start_server("--max-per-ip=200")
    first = start_gateway(old_server.port)
    alice = pages.open(first.url)
    join(alice, "alice")
    dave = open_client(old_server.port, "dave")
    dave.send({"type": "say", "text": "old run"})
    expect(message_entry(alice, "dave", "old run")).to_have_count(1)
    first.kill()
    old_server.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    # The new run's sequence numbers pass the page's last seq before it is
    # back, so only the welcome's epoch tells the page they are new events.
    new_server = start_server("--max-per-ip=200", f"--port={old_server.port}")
    erin = open_client(new_server.port, "erin")
    for n in range(8):
        erin.send({"type": "say", "text": f"new run {n}"})
    _room_log(erin, "new run 7")
    start_gateway(new_server.port, http_port=first.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=20_000)
    expect(alice.locator("#transcript li.notice", has_text="restarted")).to_have_count(1)
    expect(message_entry(alice, "erin", "new run 0")).to_have_count(1)
    erin.send({"type": "say", "text": "after"})
    expect(message_entry(alice, "erin", "after")).to_have_count(1)


def test_reconnect_waits_while_its_name_is_still_taken(server, start_gateway, pages, connect):
    expect = expect_()
    first = start_gateway(server.port)
    alice = pages.open(first.url)
    join(alice, "alice")
    first.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    # Someone holds the name while the page is away (as a stale session would).
    squatter = connect()
    deadline = time.monotonic() + 10
    while True:
        squatter.send({"type": "hello", "name": "alice"})
        reply = squatter.recv_until(lambda m: m["type"] in ("welcome", "error"))[0]
        if reply["type"] == "welcome":
            break
        assert time.monotonic() < deadline, "the old session never left"
        time.sleep(0.1)
    start_gateway(server.port, http_port=first.port)
    expect(alice.locator("#status-text")).to_contain_text("waiting for the old session")
    squatter.send({"type": "say", "text": "squatting"})
    squatter.send({"type": "quit"})
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected")
    expect(message_entry(alice, "alice", "squatting")).to_have_count(1)
    seqs = [e["seq"] for e in room_entries(alice)]
    assert seqs == list(range(1, seqs[-1] + 1))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot_of_a_conversation(server, gateway, pages, connect):
    expect = expect_()
    bob = connect("bob")
    bob.send({"type": "say", "text": "Morning! Is the deploy still on for 10:30?"})
    bob.recv_until(lambda m: m.get("type") == "message")
    shots = {}
    for name, viewport in (("chat.png", DESKTOP), ("chat-375.png", PHONE)):
        who = "alice" if name == "chat.png" else "ana"
        page = pages.open(gateway.url, viewport)
        join(page, who)
        say(page, "Yes \u2014 I'll post in here when it starts.")
        bob.send({"type": "say", "text": f"Great, thanks {who}. <b>Tags</b> stay as text."})
        expect(message_entry(page, "bob", f"Great, thanks {who}. <b>Tags</b> stay as text."))\
            .to_have_count(1)
        say(page, f"/msg bob can you review PR 42 first? \u2014{who}")
        expect(page.locator("#transcript li.private")).to_have_count(1)
        page.evaluate("document.activeElement.blur()")
        path = ARTIFACTS / name
        page.screenshot(path=str(path))
        shots[name] = _png_size(path)
        assert path.stat().st_size > 10_000
    assert shots["chat.png"] == (DESKTOP["width"], DESKTOP["height"])
    assert shots["chat-375.png"] == (PHONE["width"], PHONE["height"])
    # Nothing spills sideways at phone width.
    page = pages.contexts[-1].pages[0]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert pages.problems == []
