"""Helpers for the browser tests: the gateway as a subprocess, Chromium and
its pages as fixtures (imported by each browser test module), and a few page
actions."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import Program

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# Every wait on the page is bounded by this (milliseconds).
TIMEOUT_MS = 10_000
SERVING = re.compile(r"serving on http://(\S+?):(\d+)/")


def require_chromium() -> None:
    """Skip when Chromium or Playwright is missing, except under CI=true,
    where a browser test that cannot run is a failure."""
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is not installed"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as exc:
            problem = f"playwright is not importable: {exc}"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests must run under CI: {problem}")
    pytest.skip(problem)


class GatewayProcess(Program):
    """``python -m gateway`` in a subprocess; ``url`` is read from its
    ``serving on http://HOST:PORT/`` log line."""

    def __init__(self, log_dir: Path, chat_port: int, http_port: int = 0,
                 *args: str) -> None:
        super().__init__(log_dir, "-m", "gateway", f"--http-port={http_port}",
                         "--chat-host=127.0.0.1", f"--chat-port={chat_port}", *args)
        try:
            match = self.wait_log(SERVING)
        except AssertionError as exc:
            self.kill()
            raise RuntimeError(f"gateway did not start: {exc}") from None
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = f"http://{self.host}:{self.port}/"


PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1200, "height": 760}


def expect_():
    """Playwright's ``expect``, imported only once Chromium is known to run."""
    from playwright.sync_api import expect

    return expect


# --- page actions ------------------------------------------------------------

def join(page, name: str) -> None:
    """Type ``name`` in the join form, press Enter, wait until in the room."""
    from playwright.sync_api import expect

    page.fill("#join-name", name)
    page.press("#join-name", "Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#transcript li.join.mine")).to_have_count(1)


def say(page, text: str) -> None:
    """Type ``text`` in the message box and press Enter."""
    from playwright.sync_api import expect

    page.fill("#compose-text", text)
    page.press("#compose-text", "Enter")
    expect(page.locator("#compose-text")).to_have_value("")


def message_entry(page, sender: str, text: str):
    """Locator for room messages from ``sender`` (a name) whose text is ``text``."""
    return (page.locator("#transcript li.message")
            .filter(has=page.locator(".sender", has_text=re.compile(f"^{re.escape(sender)}$")))
            .filter(has=page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$"))))


def notice_entry(page, kind: str, name: str):
    """Locator for ``join`` or ``leave`` notices about member ``name``."""
    return (page.locator(f"#transcript li.{kind}")
            .filter(has=page.locator(".sender", has_text=re.compile(f"^{re.escape(name)}$"))))


def member_names(page) -> list[str]:
    return page.eval_on_selector_all(
        "#member-list .member-name", "els => els.map(e => e.textContent)")


def room_entries(page) -> list[dict]:
    """Every room event in the transcript: seq, kind and text, in page order."""
    return page.eval_on_selector_all(
        "#transcript li[data-seq]",
        """els => els.map(e => ({
            seq: Number(e.dataset.seq),
            kind: e.classList.contains('message') ? 'message'
                : e.classList.contains('join') ? 'join' : 'leave',
            sender: e.querySelector('.sender').textContent,
            text: e.querySelector('.text').textContent.trim(),
        }))""")
