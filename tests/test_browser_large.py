"""The page in a large room (more members than the server's
--announce-limit), in real headless Chromium through the real gateway:
the count, a member panel that pages as it scrolls and searches by name,
drawn a screenful at a time, and private messages to a member found there."""

from __future__ import annotations

import pytest
from browser_helpers import DESKTOP, PHONE, expect_
from conftest import ARTIFACTS

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

ROW_PX = 36  # member-pager.js ROW_PX
NAMES = [f"member-{n:03d}" for n in range(300)] + ["yuki", "Zelda", "zeno"]


def seat(open_client, port: int, name: str):
    """A raw member: hello, then the welcome (no join is broadcast when large)."""
    client = open_client(port)
    client.send({"type": "hello", "name": name})
    welcome = client.recv_type("welcome")
    client.label = welcome["label"]
    return client


def join_large(page, name: str) -> None:
    expect = expect_()
    page.fill("#join-name", name)
    page.press("#join-name", "Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#members")).to_have_attribute("data-large", "true")


def rows(page) -> list[str]:
    return page.eval_on_selector_all("#member-pager .member-name",
                                     "els => els.map(e => e.textContent)")


def scroll_pager(page, top: int) -> None:
    """Scroll the panel and let it draw at once (its scroll handler runs now)."""
    page.eval_on_selector(
        "#member-pager",
        "(p, top) => { p.scrollTop = top; p.dispatchEvent(new Event('scroll')); }", top)


def test_member_panel_in_a_large_room(start_server, start_gateway, pages, open_client):
    expect = expect_()
    server = start_server("--max-per-ip=400", "--announce-limit=50")
    gateway = start_gateway(server.port)
    members = {name: seat(open_client, server.port, name) for name in NAMES}
    alice = pages.open(gateway.url, DESKTOP)
    join_large(alice, "alice")
    everyone = sorted(NAMES + ["alice"], key=str.casefold)
    count = alice.locator("#member-count")
    expect(count).to_have_text(str(len(everyone)))
    expect(alice.locator("#member-pager .member-name").first).to_have_text("alice")
    expect(alice.locator("#member-list")).to_be_hidden()

    # Page by page to the end, by scrolling.
    pager = alice.locator("#member-pager")
    for _ in range(10):
        scroll_pager(alice, 10**6)
        alice.wait_for_function("() => !document.querySelector('#member-pager .pager-loading')")
        if rows(alice)[-1:] == ["zeno"]:
            break
    assert rows(alice)[-1] == "zeno"
    assert pager.evaluate("p => p.firstElementChild.offsetHeight") == len(everyone) * ROW_PX
    whos = [m for m in pages.sent[0] if m["type"] == "who"]
    assert [m["limit"] for m in whos] == [100] * len(whos)
    assert len(whos) == 4 and "cursor" not in whos[0]
    assert [m["cursor"] for m in whos[1:]] == [n.casefold() for n in everyone[99:300:100]]
    # Only rows in view (and a few either side) are in the DOM.
    drawn = alice.locator("#member-pager li").count()
    in_view = pager.evaluate("p => Math.ceil(p.clientHeight / 36)")
    assert drawn <= in_view + 13 < 40
    # A place in the middle shows the members that belong there.
    scroll_pager(alice, 150 * ROW_PX)
    assert everyone[150] in rows(alice)[:8]
    assert alice.locator("#member-list li").count() == 0

    # Search by the start of a name, ignoring case.
    search = alice.locator("#member-search")
    search.fill("ZE")
    expect(alice.locator("#member-pager .member-name")).to_have_text(["Zelda", "zeno"])
    search.fill("nobody")
    expect(alice.locator("#member-pager .pager-empty")).to_have_text(
        "No one\u2019s name starts with \u201cnobody\u201d.")
    search.fill("zel")
    expect(alice.locator("#member-pager .member-name")).to_have_text(["Zelda"])
    assert {"type": "who", "limit": 100, "prefix": "zel"} in pages.sent[0]

    # A private message to a member found by search, through the To menu.
    alice.locator("#member-pager button.member-body", has_text="Zelda").click()
    expect(alice.locator("#compose-to option:checked")).to_have_text("Zelda")
    alice.fill("#compose-text", "psst Zelda")
    alice.press("#compose-text", "Enter")
    got = members["Zelda"].recv_until(lambda m: m["type"] == "private", timeout=10)[0]
    assert got["text"] == "psst Zelda" and got["from"].startswith("alice@")
    expect(alice.locator("#transcript li.private.mine")).to_contain_text("to Zelda")
    # A member who writes privately can be answered from the menu too.
    members["yuki"].send({"type": "private", "to": "alice", "text": "hi alice"})
    expect(alice.locator("#transcript li.private").filter(has_text="hi alice")).to_have_count(1)
    expect(alice.locator("#compose-to option")).to_have_text(["Everyone", "yuki", "Zelda"])

    # The count follows presence: no join or leave notices in a large room
    # (those shown are the replayed ones from while it was small).
    notices = alice.locator("#transcript li.join, #transcript li.leave")
    shown = notices.count()
    members["member-000"].send({"type": "quit"})
    expect(count).to_have_text(str(len(everyone) - 1))
    erin = seat(open_client, server.port, "erin")
    expect(count).to_have_text(str(len(everyone)))
    assert notices.count() == shown
    erin.close()
    assert pages.problems == []

    # At phone width: the count, the search box and a few rows.
    ana = pages.open(gateway.url, PHONE)
    join_large(ana, "ana")
    ana.fill("#member-search", "ze")
    expect(ana.locator("#member-pager .member-name")).to_have_text(["Zelda", "zeno"])
    expect(ana.locator("#member-pager")).to_have_attribute("data-end", "true")
    ana.fill("#member-search", "")
    expect(ana.locator("#member-pager .member-name").first).to_have_text("alice")
    # Members below the short panel fade its bottom edge.
    expect(ana.locator("#member-pager")).to_have_attribute("data-end", "false")
    ana.evaluate("document.activeElement.blur()")
    ana.screenshot(path=str(ARTIFACTS / "members-large-375.png"))
    assert ana.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    alice.screenshot(path=str(ARTIFACTS / "members-large.png"))


def test_a_room_crossing_the_announce_limit_both_ways(start_server, start_gateway, pages,
                                                      open_client):
    expect = expect_()
    server = start_server("--max-per-ip=400", "--announce-limit=3")
    gateway = start_gateway(server.port)
    alice = pages.open(gateway.url)
    alice.fill("#join-name", "alice")
    alice.press("#join-name", "Enter")
    expect(alice.locator("#transcript li.join.mine")).to_have_count(1)
    bob = seat(open_client, server.port, "bob")
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "bob"])
    expect(alice.locator("#members")).to_have_attribute("data-large", "false")

    # Past the limit: the whole list gives way to the pager.
    others = [seat(open_client, server.port, name) for name in ("carol", "dave", "erin")]
    expect(alice.locator("#members")).to_have_attribute("data-large", "true")
    expect(alice.locator("#member-count")).to_have_text("5")
    expect(alice.locator("#member-pager .member-name")).to_have_text(
        ["alice", "bob", "carol", "dave", "erin"])

    # Back under it: the whole list again, and joins and leaves are shown.
    for client in others:
        client.send({"type": "quit"})
    expect(alice.locator("#members")).to_have_attribute("data-large", "false")
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "bob"])
    expect(alice.locator("#member-count")).to_have_text("2")
    bob.send({"type": "quit"})
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice"])
    assert pages.problems == []
