"""Prometheus metrics, one registry per application.

A registry per app (not the process-wide default) lets tests build many
apps in one process without "duplicated timeseries" errors, and keeps one
app's numbers out of another's /metrics.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

# Session close reasons, the values of the ``reason`` label.
CLOSE_REASONS = (
    "browser_closed",  # the browser closed or vanished (incl. missed heartbeats)
    "server_closed",  # the chat server closed the TCP connection
    "unreachable",  # could not connect to the chat server
    "overflow",  # the browser fell too far behind: queue full
    "hello_timeout",  # no hello in time
    "shutdown",  # the gateway is shutting down
    "error",  # a bug in the gateway (logged with a traceback)
)


class Metrics:
    """The gateway's instruments, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions = Gauge(
            "gateway_sessions", "WebSocket sessions open now", registry=self.registry)
        self.relayed = Counter(
            "gateway_messages_relayed", "Messages relayed, by direction",
            ["direction"], registry=self.registry)
        self.rejected = Counter(
            "gateway_messages_rejected", "Browser messages refused as bad, not forwarded",
            registry=self.registry)
        self.connect_failures = Counter(
            "gateway_upstream_connect_failures", "Failed connections to the chat server",
            registry=self.registry)
        self.closes = Counter(
            "gateway_session_closes", "Sessions closed, by reason",
            ["reason"], registry=self.registry)
        # Pre-create label values so every series shows from the first scrape.
        for direction in ("to_server", "to_browser"):
            self.relayed.labels(direction)
        for reason in CLOSE_REASONS:
            self.closes.labels(reason)

    def render(self) -> web.Response:
        """Return a /metrics response in the Prometheus text format."""
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
