"""The page at phone width (375 px) in real headless Chromium: the member
chips, the transcript across a rotation, and the member list while the
page reconnects."""

from __future__ import annotations

import pytest
from browser_helpers import PHONE, expect_, join, member_names, message_entry
from conftest import ARTIFACTS

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

LANDSCAPE = {"width": PHONE["height"], "height": PHONE["width"]}

# Per chip: is it inside the list's visible box, and does it stick out sideways?
CHIP_BOXES = """list => {
    const box = list.getBoundingClientRect();
    return Array.from(list.children).map(chip => {
        const r = chip.getBoundingClientRect();
        return {
            name: chip.querySelector('.member-name').textContent,
            seen: r.top >= box.top - 1 && r.bottom <= box.bottom + 1,
            sideways: r.left < box.left - 1 || r.right > box.right + 1,
            clipped: chip.scrollWidth > chip.clientWidth + 1,
        };
    });
}"""

AT_END = "t => t.scrollHeight - t.scrollTop - t.clientHeight < 2"


def settle(page) -> None:
    """Wait two animation frames: resize observers have run by then."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def test_member_chips_wrap_and_count_what_is_out_of_sight(server, gateway, pages, connect):
    expect = expect_()
    names = ["bob", "carol", "caroline-the-third-of-her-name", "dave", "erin", "frank",
             "grace", "heidi", "ivan", "judy", "mallory", "niaj", "olivia", "peggy"]
    for name in names:
        connect(name)
    page = pages.open(gateway.url, PHONE)
    join(page, "ana")
    expect(page.locator("#member-count")).to_have_text(str(len(names) + 1))
    assert member_names(page) == ["ana"] + names

    chips = page.eval_on_selector("#member-list", CHIP_BOXES)
    assert [c for c in chips if c["sideways"] or c["clipped"]] == [], "a chip is cut off"
    unseen = [c["name"] for c in chips if not c["seen"]]
    assert unseen, "this many members should not all fit in two rows at 375 px"
    more = page.locator("#member-more")
    expect(more).to_be_visible()
    expect(more).to_have_text(f"+{len(unseen)} more \u2193")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(ARTIFACTS / "members-375.png"))

    # The button scrolls on until every member has been in view.
    seen = {c["name"] for c in chips if c["seen"]}
    for _ in range(len(names)):
        if more.text_content().endswith("\u2191"):
            break
        more.click()
        settle(page)
        seen |= {c["name"] for c in page.eval_on_selector("#member-list", CHIP_BOXES)
                 if c["seen"]}
    assert seen == {"ana", *names}
    # A member reached this way is one tap from a private message.
    page.locator("#member-list button.member-body", has_text="peggy").click()
    expect(page.locator("#compose-to option:checked")).to_have_text("peggy")
    assert pages.problems == []


def test_transcript_stays_at_the_end_across_a_rotation(start_server, start_gateway, pages,
                                                       open_client):
    expect = expect_()
    server = start_server("--max-per-ip=200", "--msg-burst=100")
    gateway = start_gateway(server.port)
    bob = open_client(server.port, "bob")
    page = pages.open(gateway.url, PHONE)
    join(page, "ana")
    for n in range(40):
        bob.send({"type": "say", "text": f"line {n}" + " words" * (n % 7)})
    expect(message_entry(page, "bob", "line 39" + " words" * 4)).to_have_count(1)
    transcript = page.locator("#transcript")
    assert transcript.evaluate(AT_END)

    for viewport in (LANDSCAPE, PHONE, LANDSCAPE, PHONE):
        page.set_viewport_size(viewport)
        settle(page)
        assert transcript.evaluate(AT_END), f"not at the end after turning to {viewport}"

    # A reader who scrolled back is left where they are.
    transcript.evaluate("t => { t.scrollTop = 0; }")
    settle(page)
    page.set_viewport_size(LANDSCAPE)
    settle(page)
    assert transcript.evaluate("t => t.scrollTop") == 0
    bob.send({"type": "say", "text": "while reading back"})
    expect(message_entry(page, "bob", "while reading back")).to_have_count(1)
    settle(page)
    assert transcript.evaluate("t => t.scrollTop") == 0
    # Back at the end, new lines are followed again, in any orientation.
    transcript.evaluate("t => { t.scrollTop = t.scrollHeight; }")
    settle(page)
    page.set_viewport_size(PHONE)
    bob.send({"type": "say", "text": "followed"})
    expect(message_entry(page, "bob", "followed")).to_have_count(1)
    settle(page)
    assert transcript.evaluate(AT_END)
    assert pages.problems == []


def test_member_list_is_marked_stale_while_reconnecting(server, start_gateway, pages, connect):
    expect = expect_()
    first = start_gateway(server.port)
    page = pages.open(first.url, PHONE)
    join(page, "ana")
    bob = connect("bob")
    expect(page.locator("#member-list .member-name")).to_have_text(["ana", "bob"])
    members = page.locator("#members")
    expect(members).to_have_attribute("data-stale", "false")
    expect(page.locator("#members-stale")).to_be_hidden()

    first.kill()
    expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    expect(members).to_have_attribute("data-stale", "true")
    expect(page.locator("#members-stale")).to_be_visible()
    expect(page.locator("#member-list")).to_have_attribute("aria-busy", "true")
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(ARTIFACTS / "members-stale-375.png"))
    # Bob leaves while the page cannot hear of it.
    bob.send({"type": "quit"})
    assert bob.closed_by_server()

    start_gateway(server.port, http_port=first.port)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=20_000)
    expect(members).to_have_attribute("data-stale", "false")
    expect(page.locator("#members-stale")).to_be_hidden()
    expect(page.locator("#member-list .member-name")).to_have_text(["ana"])
    expect(page.locator("#member-count")).to_have_text("1")
