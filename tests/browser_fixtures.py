"""Browser test fixtures: one headless Chromium per module, pages that
record what their WebSockets carry, and gateways as subprocesses.  Browser
test modules load this with ``pytest_plugins = ["browser_fixtures"]``."""

from __future__ import annotations

import json

import pytest
from browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    TIMEOUT_MS,
    GatewayProcess,
    require_chromium,
)


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True, timeout=TIMEOUT_MS)
        yield chromium
        chromium.close()


class Pages:
    """Opens pages, each in its own browser context (its own cookies and
    sockets), and records console errors, page errors and dialogs."""

    def __init__(self, browser) -> None:
        self.browser = browser
        self.contexts = []
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.sockets: list[str] = []  # URLs of every WebSocket the pages opened
        self.sent: list[list[dict]] = []  # per WebSocket, the messages the page sent
        self.received: list[list[dict]] = []  # per WebSocket, what the gateway relayed

    def open(self, url: str, viewport: dict = DESKTOP):
        context = self.browser.new_context(viewport=viewport)
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("dialog", self._on_dialog)
        page.on("websocket", self._on_websocket)
        page.goto(url)
        return page

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_websocket(self, ws) -> None:
        self.sockets.append(ws.url)
        sent: list[dict] = []
        self.sent.append(sent)
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))
        received: list[dict] = []
        self.received.append(received)
        # One frame may batch several payloads, one per line.
        ws.on("framereceived", lambda payload: received.extend(
            json.loads(line) for line in payload.split("\n")))

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser):
    opened = Pages(browser)
    yield opened
    opened.close()


@pytest.fixture
def start_gateway(tmp_path):
    """Factory: ``start_gateway(chat_port, http_port=0) -> GatewayProcess``."""
    started: list[GatewayProcess] = []

    def start(chat_port: int, http_port: int = 0) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path, chat_port, http_port)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.kill()


@pytest.fixture
def gateway(server, start_gateway) -> GatewayProcess:
    return start_gateway(server.port)


