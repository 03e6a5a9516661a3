"""/health: is the chat server answering?

The probe connects, sends a pre-hello ``ping`` (allowed by the protocol
exactly so that probes never join the room), waits for the matching
``pong`` and hangs up.  Results are cached for ``health_cache`` seconds and
concurrent requests share one in-flight probe, so however hard /health is
polled the chat server sees at most one probe connection per period.

The answer, 200 while the chat server answers and can store messages, 503
when it does not answer ("unavailable") or says in its pong that it is
``degraded`` (e.g. its disk is full: it refuses messages until it can store
them)::

    {"status": "ok" | "degraded" | "unavailable",
     "chat_server": {"reachable": bool, "rtt_ms": float | null, "address": "host:port",
                     "error": str | null, "degraded": str | null},
     "sessions": int, "uptime_s": float, "version": str}
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import GatewayConfig
from tcpserver import protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    rtt_ms: float | None
    error: str | None = None
    # The pong's reason the room cannot accept messages, if any.
    degraded: str | None = None


class HealthProbe:
    """A cached, shared ping of the chat server."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.probes = 0  # connections actually made, for tests and debugging
        self._tokens = itertools.count(1)
        self._result: ProbeResult | None = None
        self._checked_at = 0.0
        self._inflight: asyncio.Task[ProbeResult] | None = None

    async def check(self) -> ProbeResult:
        """Return a fresh-enough probe result.  Never raises (but may be cancelled)."""
        if (self._result is not None
                and time.monotonic() - self._checked_at < self.config.health_cache):
            return self._result
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._probe())
            self._inflight.add_done_callback(self._store)
        # Shielded: one impatient caller going away must not cancel the
        # probe the others are waiting for.
        return await asyncio.shield(self._inflight)

    def _store(self, task: asyncio.Task[ProbeResult]) -> None:
        self._inflight = None
        if not task.cancelled():
            self._result = task.result()
            self._checked_at = time.monotonic()

    def forget(self) -> None:
        """Drop the cached result: the next check probes afresh.  The
        launcher calls it when its server dies, so /health says so at once."""
        self._result = None

    async def close(self, app: web.Application | None = None) -> None:
        """on_cleanup: cancel a probe still in flight."""
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _probe(self) -> ProbeResult:
        self.probes += 1
        start = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        token = f"health-{next(self._tokens)}"
        try:
            async def ping() -> dict:
                nonlocal writer
                reader, writer = await asyncio.open_connection(
                    self.config.chat_host, self.config.chat_port)
                writer.write(protocol.encode_frame({"type": "ping", "token": token}))
                return await _await_pong(reader, token, self.config.max_frame)

            pong = await asyncio.wait_for(ping(), self.config.health_timeout)
            degraded = pong.get("degraded")
            if degraded is not None:
                log.warning("chat server at %s is degraded: %s", self.config.chat_address,
                            degraded)
            return ProbeResult(True, round((time.monotonic() - start) * 1000, 3),
                               degraded=degraded)
        except asyncio.TimeoutError:
            return self._failed(f"no pong within {self.config.health_timeout:g} s")
        except ConnectionRefusedError:
            # asyncio's text ("Connect call failed (...)") says less than this.
            return self._failed("connection refused")
        except (OSError, protocol.ProtocolError) as exc:
            return self._failed(getattr(exc, "strerror", None) or str(exc))
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass  # a reset on the way out changes nothing

    def _failed(self, error: str) -> ProbeResult:
        log.warning("health probe of %s failed: %s", self.config.chat_address, error)
        return ProbeResult(False, None, error)


async def _await_pong(reader: asyncio.StreamReader, token: str, max_frame: int) -> dict:
    """Read until the pong for ``token``; return it.

    Raises ConnectionError if the server hangs up or refuses us first, and
    protocol.ProtocolError for a bad frame.
    """
    decoder = protocol.FrameDecoder(max_frame)
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the chat server closed the connection")
        decoder.receive_data(data)
        while (payload := decoder.next_payload()) is not None:
            message = protocol.parse_server_message(payload)
            if message["type"] == "pong" and message.get("token") == token:
                return message
            if message["type"] == "error":
                raise ConnectionError(f"{message['code']}: {message['message']}")


class HealthView:
    """GET /health: 200 while the chat server answers and is not degraded,
    503 when it does not answer or is degraded."""

    def __init__(self, probe: HealthProbe, sessions: Callable[[], int], version: str) -> None:
        self.probe = probe
        self.sessions = sessions
        self.version = version
        self.started = time.monotonic()

    async def handle(self, request: web.Request) -> web.Response:
        """Return the health document (see the module docstring); never raises."""
        result = await self.probe.check()
        if not result.reachable:
            status = "unavailable"
        else:
            status = "ok" if result.degraded is None else "degraded"
        body = {
            "status": status,
            "chat_server": {
                "reachable": result.reachable,
                "rtt_ms": result.rtt_ms,
                "address": self.probe.config.chat_address,
                "error": result.error,  # why it is unreachable, for the operator
                "degraded": result.degraded,  # why it refuses messages
            },
            "sessions": self.sessions(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": self.version,
        }
        return web.json_response(body, status=200 if status == "ok" else 503,
                                 headers={"Cache-Control": "no-store"})
