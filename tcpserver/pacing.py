"""A connection's clock, with no sockets: its rate-limit tokens and its
timeouts, as functions of the client's state, the limits and the time
(monotonic seconds).  The server acts on what they say."""

from __future__ import annotations

from tcpserver.client_state import Client
from tcpserver.settings import Limits

# Slack for float rounding when a throttled client wakes for its token.
_TOKEN_EPSILON = 1e-9


def take_token(client: Client, limits: Limits, now: float) -> bool:
    """Token bucket: take one; False if the client must wait for it."""
    tokens = min(limits.msg_burst,
                 client.tokens + (now - client.token_time) * limits.msg_rate)
    client.token_time = now
    if tokens >= 1 - _TOKEN_EPSILON:
        client.tokens = max(0.0, tokens - 1)
        return True
    client.tokens = tokens
    return False


def next_deadline(client: Client, limits: Limits) -> float:
    """The earliest time one of the client's timers can fire."""
    if client.closing:
        return client.close_deadline
    when = client.last_recv + (limits.idle_timeout if client.pinged
                               else limits.idle_timeout / 2)
    if client.name is None:
        when = min(when, client.connected_at + limits.hello_timeout)
    if client.partial_since:
        when = min(when, client.partial_since + limits.frame_timeout)
    if client.wake_at:
        when = min(when, client.wake_at)
    return when


def timed_out(client: Client, limits: Limits, now: float) -> tuple[str, str] | None:
    """The timeout an open client has run into at ``now``, as (error code,
    message), the first of hello, frame and idle; None if none has."""
    if client.name is None and now >= client.connected_at + limits.hello_timeout:
        return "hello_timeout", f"no hello within {limits.hello_timeout:g} s"
    if client.partial_since and now >= client.partial_since + limits.frame_timeout:
        return "frame_timeout", f"frame not finished within {limits.frame_timeout:g} s"
    if now >= client.last_recv + limits.idle_timeout:
        return "idle_timeout", f"silent for {limits.idle_timeout:g} s"
    return None
