"""The chat server's Prometheus metrics (``--metrics-port``).

The select loop never calls prometheus_client.  It keeps plain integers in
a ``ServerStats`` (a few adds per loop turn, one per ``send`` call for the
bytes written, none per recipient), and a custom collector turns them into
metric families when /metrics is scraped.  The HTTP server runs in
prometheus_client's own thread and only reads: ints and ``len()`` of the
server's containers are read atomically under the GIL, so no lock is taken
on the loop's side.

Exported (all ``chat_``; counters end in ``_total``):

* ``chat_members`` (gauge): members whose connections are on this node;
* ``chat_events_published_total``: room events this node committed to the
  room log (its own members' says, joins, leaves);
* ``chat_stream_events_total``: frames appended to this node's room stream,
  every node's events included when the room is in Redis;
* ``chat_deliveries_total``: stream frames times the members following the
  stream when they were put on it (counted once per loop turn);
* ``chat_bytes_out_total``: bytes written to clients' sockets;
* ``chat_evictions_total``: members evicted as slow readers;
* ``chat_connections_accepted_total``, ``chat_connections_refused_total``
  (label ``reason``: the error code sent, e.g. ``server_full``);
* with Redis only: ``chat_redis_round_trip_seconds`` (histogram: one
  pipelined write until its last reply) and ``chat_stream_lag_events`` /
  ``chat_stream_lag_seconds`` (gauges: how far this node's delivery is
  behind the room's Redis stream);
* prometheus_client's ``process_*`` metrics (CPU seconds, memory, fds).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the Redis round-trip histogram: a loopback
# round trip is ~0.1 ms, a LAN one ~0.5 ms, and anything past 100 ms
# already stalls the room's deliveries.
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0)

# Refusal codes shown from the first scrape, before any refusal happened.
REFUSAL_REASONS = ("server_full", "too_many_connections")


class ServerStats:
    """Plain counters written by the server's loop thread only.

    Each RoomLog owns one (``log.stats``) and the server shares it.
    Writers add to the attributes directly (``stats.published += n``, by the
    log once the events are stored); the Redis engine also calls
    ``redis_round_trip`` once per round trip and sets
    ``stream_lag_events`` / ``stream_lag_seconds`` once per loop turn.  Lag
    stays None (not exported) on a node without Redis.
    """

    __slots__ = ("accepted", "refused", "published", "stream_events", "delivered",
                 "bytes_out", "evictions", "stream_lag_events", "stream_lag_seconds",
                 "rtt_buckets", "rtt_sum", "redis")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.published = 0
        self.stream_events = 0
        self.delivered = 0
        self.bytes_out = 0
        self.evictions = 0
        self.stream_lag_events: int | None = None
        self.stream_lag_seconds: float | None = None
        # One count per RTT_BUCKETS bound, plus one past the last (+Inf).
        self.rtt_buckets = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0
        self.redis = False  # set by the Redis engine: export its metrics

    def refuse(self, reason: str) -> None:
        """Count a connection refused with error code ``reason``."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def redis_round_trip(self, seconds: float) -> None:
        """Record one Redis round trip of ``seconds`` (a pipelined write
        until its last reply).  A list index add: cheap enough per turn."""
        self.redis = True
        self.rtt_buckets[bisect.bisect_left(RTT_BUCKETS, seconds)] += 1
        self.rtt_sum += seconds


class _StatsCollector(Collector):
    """Metric families built from a ServerStats at scrape time."""

    def __init__(self, stats: ServerStats, members: Callable[[], int]) -> None:
        self.stats = stats
        self.members = members

    def collect(self):
        s = self.stats
        yield GaugeMetricFamily("chat_members", "Members connected to this node",
                                value=self.members())
        for name, text, value in (
            ("chat_events_published", "Room events this node committed to the room log",
             s.published),
            ("chat_stream_events", "Frames appended to this node's room stream",
             s.stream_events),
            ("chat_deliveries", "Stream frames times members following the stream",
             s.delivered),
            ("chat_bytes_out", "Bytes written to clients", s.bytes_out),
            ("chat_evictions", "Members evicted as slow readers", s.evictions),
            ("chat_connections_accepted", "Connections accepted", s.accepted),
        ):
            yield CounterMetricFamily(name, text, value=value)
        refused = CounterMetricFamily("chat_connections_refused",
                                      "Connections refused, by error code", labels=["reason"])
        for reason, count in list(s.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        if not s.redis:
            return
        counts = list(s.rtt_buckets)  # one copy, so count and buckets agree
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, RTT_BUCKETS), "+Inf"), counts):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("chat_redis_round_trip_seconds",
                                    "Redis round trips: a pipelined write until its last reply",
                                    buckets=buckets, sum_value=s.rtt_sum)
        if s.stream_lag_events is not None:
            yield GaugeMetricFamily("chat_stream_lag_events",
                                    "Room stream entries in Redis not yet delivered here",
                                    value=s.stream_lag_events)
        if s.stream_lag_seconds is not None:
            yield GaugeMetricFamily("chat_stream_lag_seconds",
                                    "Age of the newest stream entry when delivered here",
                                    value=s.stream_lag_seconds)


def registry_for(stats: ServerStats, members: Callable[[], int]) -> CollectorRegistry:
    """A registry with the server's metrics and the process metrics.

    ``members`` returns the members on this node; it is called from the
    scraping thread, so it must only read (e.g. ``len()`` of a set).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, members))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """/metrics over HTTP in a daemon thread (prometheus_client's WSGI server).

    Raises OSError if ``host:port`` cannot be bound.  ``port`` 0 picks a
    free one; ``address`` is the bound (host, port).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.address = self._httpd.server_address[:2]
        log.info("metrics on http://%s:%d/metrics", host, self.address[1])

    def close(self) -> None:
        """Stop serving and close the socket (waits up to ~0.5 s)."""
        self._httpd.shutdown()
        self._httpd.server_close()
