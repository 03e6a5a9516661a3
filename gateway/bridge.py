"""/ws: admit a browser's WebSocket and relay it to the chat server.

Refused before the upgrade, so no WebSocket is ever opened for them:

* 403 a Host the gateway does not serve (``app._check_host``, before this
  handler runs) or a foreign Origin (see ``policy.origin_allowed``);
* 429 the address already has ``max_sessions_per_ip`` sessions open (an
  HTTP status says why more plainly than a close right after opening);
* 503 the gateway is shutting down.

Close codes the browser can see once connected:

* 1012 the chat server closed after a ``shutdown`` notice (an orderly
  close: "service restart"); its text is the reason.
* 1011 the chat server connection ended without a notice (crash, kill -9,
  reset), could not be made, or carried a bad frame.
* 1008 the chat server closed us with a closing ``error`` about our conduct
  (``idle_timeout``, ``flooding``, ...), or no ``hello`` within the hello
  timeout.
* 1013 the chat server closed us with ``server_full`` or
  ``too_many_connections``; or the browser fell ``queue_size`` messages
  behind.  Rather than drop messages silently the session ends; "try again
  later" tells the page to reconnect and fill its gap with ``history``.
* 1001 the gateway is shutting down.
* 1009 a message over the frame limit (aiohttp closes before we see it).

Whenever the chat server closes, every frame it sent comes before the close.
1000 is not used for server closes.

A browser that closes with 1000 or 1001 has left on purpose: its session
sends the chat server ``quit`` (``session.LEAVING_CODES``), so the room
sees reason ``quit``; any other end is a hang-up.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter

from aiohttp import WSCloseCode, hdrs, web

from gateway import policy
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.session import Session

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "the gateway is shutting down"


class Bridge:
    """The /ws handler and the set of live sessions."""

    def __init__(self, config: GatewayConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        # Weak, so a session that ends by any path cannot leak through here.
        self.sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self.per_address: Counter[str] = Counter()
        self.shutting_down = False

    @property
    def session_count(self) -> int:
        """How many WebSocket sessions are open now."""
        return len(self.sessions)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one WebSocket until it closes; return the finished response.

        Raises HTTPForbidden, HTTPTooManyRequests or HTTPServiceUnavailable
        (before the upgrade) as listed in the module docstring.
        """
        config = self.config
        if self.shutting_down:
            raise web.HTTPServiceUnavailable(text=SHUTDOWN_REASON)
        origin = request.headers.get(hdrs.ORIGIN)
        if not policy.origin_allowed(origin, request.headers.get(hdrs.HOST),
                                     config.allowed_origins):
            log.info("refused a WebSocket from origin %r", origin[:100] if origin else origin)
            raise web.HTTPForbidden(text="cross-origin WebSocket refused")
        address = policy.client_address(
            request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ()),
            config.trusted_proxies, request.headers.getall(hdrs.FORWARDED, ()))
        key = address or "unknown"
        if self.per_address[key] >= config.max_sessions_per_ip:
            log.info("refused a WebSocket from %s: %d sessions open", key,
                     self.per_address[key])
            raise web.HTTPTooManyRequests(
                text=f"at most {config.max_sessions_per_ip} sessions per address")

        ws = web.WebSocketResponse(heartbeat=config.heartbeat, max_msg_size=config.max_frame,
                                   compress=config.ws_deflate)
        self.per_address[key] += 1
        try:
            await ws.prepare(request)
            session = Session(ws, address, config, self.metrics)
            self.sessions.add(session)
            self.metrics.sessions.inc()
            log.debug("%s opened", session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
                self.metrics.sessions.dec()
        finally:
            self.per_address[key] -= 1
            if not self.per_address[key]:
                del self.per_address[key]
        return ws

    async def shutdown(self, app: web.Application) -> None:
        """on_shutdown: close every session with 1001 and wait for them."""
        self.shutting_down = True
        sessions = list(self.sessions)
        if sessions:
            log.info("closing %d sessions", len(sessions))
        for session in sessions:
            session.close(WSCloseCode.GOING_AWAY, SHUTDOWN_REASON, "shutdown")
        await asyncio.gather(*(s.wait_closed() for s in sessions))
