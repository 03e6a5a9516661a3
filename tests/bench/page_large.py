"""The page's member panel in a big room: the C load generator seats N
silent members, then headless Chromium joins through the real gateway and
pages, scrolls and searches the panel.

    python tests/bench/page_large.py [--members 999,10000]

Prints a Markdown table per size: time from Join to the first rows, time to
page through every member by scrolling, list rows in the DOM and elements
in the whole document afterwards, JS heap, mean frame time while jumping
around the list, and the time a prefix search takes to show its one match.
At 999 members (1000 with the page: the default --announce-limit) the room
is small and the page shows the whole list; above it, the paged panel.
Timings belong here, not in test assertions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BenchError,
    Loadgen,
    Process,
    build_loadgen,
    raise_fd_limit,
    start_server,
    table,
)

CHROMIUM = "/usr/bin/chromium"
ROW_PX = 36  # static/member-pager.js
WAIT_MS = 60_000

SCROLL_TO_END = """p => { p.scrollTop = p.scrollHeight; p.dispatchEvent(new Event('scroll')); }"""
NOT_LOADING = "() => !document.querySelector('#member-pager .pager-loading')"
# Mean time per animation frame while the list jumps to 120 far-apart places.
FRAME_PROBE = """() => new Promise(done => {
    const large = document.getElementById('members').dataset.large === 'true';
    const p = document.getElementById(large ? 'member-pager' : 'member-list');
    let n = 0;
    const t0 = performance.now();
    function step() {
        p.scrollTop = (n * 997 * ROW) % Math.max(1, p.scrollHeight);
        n += 1;
        if (n < 120) { requestAnimationFrame(step); } else { done((performance.now() - t0) / n); }
    }
    requestAnimationFrame(step);
})""".replace("ROW", str(ROW_PX))


def measure(page, url: str, members: int) -> list[object]:
    from playwright.sync_api import expect

    page.goto(url)
    page.fill("#join-name", "pagebench")
    started = time.monotonic()
    page.press("#join-name", "Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    large = page.get_attribute("#members", "data-large") == "true"
    names = "#member-pager .member-name" if large else "#member-list .member-name"
    expect(page.locator(names).first).to_be_visible(timeout=WAIT_MS)
    first_rows = time.monotonic() - started
    page_through = "-"
    if large:
        started = time.monotonic()
        for _ in range(members // 50 + 10):
            page.eval_on_selector("#member-pager", SCROLL_TO_END)
            page.wait_for_function(NOT_LOADING, timeout=WAIT_MS)
            height = page.eval_on_selector("#member-pager",
                                           "p => p.firstElementChild.offsetHeight")
            if height >= (members + 1) * ROW_PX:
                break
        else:
            raise BenchError("the panel never reached its last member")
        page_through = f"{time.monotonic() - started:.2f}"
    rows = page.locator("#member-pager li" if large else "#member-list li").count()
    elements = page.evaluate("() => document.getElementsByTagName('*').length")
    heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0")
    frame = page.evaluate(FRAME_PROBE)
    search = "-"
    if large:
        started = time.monotonic()
        target = f"m{members - 1}"
        page.fill("#member-search", target)
        expect(page.locator(names)).to_have_text([target], timeout=WAIT_MS)
        search = f"{(time.monotonic() - started) * 1000:.0f}"
    return [members, "paged" if large else "whole list", f"{first_rows * 1000:.0f}",
            page_through, rows, elements, f"{heap / 1e6:.1f}", f"{frame:.1f}", search]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="999,10000")
    args = parser.parse_args()
    sizes = [int(n) for n in args.members.split(",")]
    raise_fd_limit(max(sizes) + 200)
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="pagebench-") as tmp_name:
        tmp = Path(tmp_name)
        binary = build_loadgen(tmp)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            for members in sizes:
                server = start_server(tmp, members, "--db=:memory:")
                gateway = hold = None
                try:
                    hold = Loadgen(binary, "hold", "chat", server.port, members, timeout=600)
                    hold.line("seated")
                    gateway = Process(
                        [sys.executable, "-m", "gateway", "--http-port=0",
                         "--chat-host=127.0.0.1", f"--chat-port={server.port}"],
                        tmp / "gateway.log", r"serving on (http://\S+?/)")
                    context = browser.new_context(viewport={"width": 1200, "height": 760})
                    rows.append(measure(context.new_page(), gateway.match.group(1), members))
                    context.close()
                finally:
                    if gateway is not None:
                        gateway.stop()
                    if hold is not None:
                        hold.close()
                    server.stop()
            browser.close()
    print(table("The page's member panel (desktop viewport, seated silent members)",
                ["members", "panel", "Join to first rows, ms", "page through all, s",
                 "list rows in DOM", "document elements", "JS heap, MB",
                 "frame while jumping, ms", "search to one match, ms"], rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
