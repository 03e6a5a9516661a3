"""Prometheus metrics, one registry per application.

A registry per app (not the process-wide default) lets tests build many
apps in one process without "duplicated timeseries" errors, and keeps one
app's numbers out of another's /metrics.

With ``--workers N`` each worker is its own process, so its numbers alone
would be a fraction of the truth.  The parent then sets
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, read
when prometheus_client is imported): every worker writes its values to
files there, and any worker's /metrics adds up all of them.  Counters are
summed over every worker that ever ran (a restarted worker does not reset
them); the sessions gauge is summed over live workers only ("livesum").
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        self.sessions = Gauge(
            "gateway_sessions", "WebSocket sessions open now", registry=self.registry,
            multiprocess_mode="livesum")
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

    def _merged(self) -> CollectorRegistry:
        """The registry to report: ours, or every worker's added up."""
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.multiprocess_dir)
        return merged

    def sessions_open(self) -> int:
        """WebSocket sessions open now, in every worker."""
        value = self._merged().get_sample_value("gateway_sessions")
        return int(value or 0)

    def render(self) -> web.Response:
        """Return a /metrics response in the Prometheus text format."""
        response = web.Response(body=generate_latest(self._merged()))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
