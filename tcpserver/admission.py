"""Who may connect: per-address counts, trusted proxies, cheap refusals.

A connection is counted under the address it stands for:

* from an untrusted peer: its own address, from accept on;
* from a trusted proxy (``--trusted-proxy``, e.g. the web gateway): nothing
  is charged to the proxy's address.  Until ``hello`` it is counted among
  the *pending proxied* connections (bounded by ``--max-pending-proxied``,
  so a proxy's bug cannot take every descriptor); at ``hello`` it is counted
  under the address the proxy forwards, or, with no ``forwarded_for`` (a
  terminal client on the proxy's own host), under the peer's address.

So a gateway's sessions are never refused because of the gateway's own
address, and its ``/health`` probe (a ``ping`` before ``hello``) meets only
the pending bound.

Refusals are cheap, because a connection flood must not stall the room:
one non-blocking send of the error frame, one read of what the peer already
sent (closing with unread input would reset the connection and could
destroy the error frame), then close.  They are logged at most once a
second, with a count.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from tcpserver import protocol
from tcpserver.client_state import Client
from tcpserver.settings import IPNetwork, Limits

log = logging.getLogger("tcpserver.server")

# Refusals logged at WARNING at most this often; the others are counted.
REFUSAL_LOG_INTERVAL = 1.0
# Addresses whose trust was looked up, kept for the next connection from
# them; cleared when full, so a flood of addresses costs only the lookups.
_TRUST_CACHE_SIZE = 4096


class Admission:
    """Connection counts by address, and the decision to admit or refuse."""

    def __init__(self, limits: Limits, trusted: tuple[IPNetwork, ...]) -> None:
        self.limits = limits
        self.trusted = trusted
        self.per_ip: dict[str, int] = {}
        self.pending_proxied = 0  # trusted-proxy connections before hello
        self._trust: dict[str, bool] = {}
        self._refused_since_log = 0
        self._last_refusal: tuple[str, str] = ("", "")
        self._next_log = 0.0

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` (a peer address string) is a trusted proxy."""
        trusted = self._trust.get(ip)
        if trusted is None:
            try:
                address = ipaddress.ip_address(ip)
                trusted = any(address in net for net in self.trusted)
            except ValueError:
                trusted = False
            if len(self._trust) >= _TRUST_CACHE_SIZE:
                self._trust.clear()
            self._trust[ip] = trusted
        return trusted

    def refusal(self, ip: str) -> tuple[str, str] | None:
        """(error code, message) if a new connection from ``ip`` must be
        refused by the address limits, else None."""
        if self.is_trusted(ip):
            if self.pending_proxied >= self.limits.max_pending_proxied:
                return ("server_full", f"too many connections from trusted proxies waiting "
                        f"for hello ({self.limits.max_pending_proxied})")
        elif self.per_ip.get(ip, 0) >= self.limits.max_per_ip:
            return ("too_many_connections", f"too many connections from {ip}")
        return None

    def admitted(self, client: Client) -> None:
        """Count a newly accepted connection."""
        if self.is_trusted(client.peer_ip):
            client.proxied = True
            self.pending_proxied += 1
        else:
            self._count(client.ip, +1)

    def at_hello(self, client: Client, address: str) -> bool:
        """Count the client under ``address`` from now on; False if that
        address is over ``--max-per-ip`` (the client is still counted there
        until it is released)."""
        if client.proxied:
            client.proxied = False
            self.pending_proxied -= 1
            client.ip = address
            self._count(address, +1)
        elif address != client.ip:
            self._count(client.ip, -1)
            client.ip = address
            self._count(address, +1)
        return self.per_ip[address] <= self.limits.max_per_ip

    def released(self, client: Client) -> None:
        """The connection closed: uncount it."""
        if client.proxied:
            client.proxied = False
            self.pending_proxied -= 1
        else:
            self._count(client.ip, -1)

    def _count(self, ip: str, delta: int) -> None:
        count = self.per_ip.get(ip, 0) + delta
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def refuse(self, sock: socket.socket, ip: str, frame: bytes, message: str,
               now: float) -> None:
        """Send ``frame`` (an encoded error) once without blocking, and close."""
        self._log_refusal(ip, message, now)
        try:
            sock.setblocking(False)
            sock.send(frame)
            # One read, not a loop: input left unread makes close() send a
            # reset, which can destroy the error frame in flight.
            sock.recv(65536)
        except OSError as exc:  # includes BlockingIOError: nothing sent yet
            if not isinstance(exc, BlockingIOError):
                log.debug("refusal to %s not delivered: %s", ip, exc)
        sock.close()

    def _log_refusal(self, ip: str, message: str, now: float) -> None:
        self._refused_since_log += 1
        self._last_refusal = (ip, message)
        log.debug("refused %s: %s", ip, message)
        self.flush_log(now)

    def flush_log(self, now: float) -> None:
        """Log the refusals not yet logged, if the last line is old enough."""
        count = self._refused_since_log
        if not count or now < self._next_log:
            return
        ip, message = self._last_refusal
        if count == 1:
            log.warning("refused %s: %s", ip, message)
        else:
            log.warning("refused %d connections; the last: %s: %s", count, ip, message)
        self._refused_since_log = 0
        self._next_log = now + REFUSAL_LOG_INTERVAL


def forwarded_address(client: Client, forwarded: str | None,
                      trusted: tuple[IPNetwork, ...]) -> str:
    """The address a ``hello`` stands for: ``forwarded`` (its
    ``forwarded_for``) when the peer is a trusted proxy, else the client's
    own.  An IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2) is given as IPv4.

    Raises protocol.MessageError (``bad_message``) if a trusted proxy
    forwards something that is not an IP address, or one with a zone.
    """
    if forwarded is None:
        return client.ip
    # Trust is decided by who is connected, never by an address claimed
    # in an earlier hello on this connection.
    peer = ipaddress.ip_address(client.peer_ip)
    if not any(peer in net for net in trusted):
        log.info("%s: ignored forwarded_for from an untrusted peer", client.peer_ip)
        return client.ip
    try:
        address = ipaddress.ip_address(forwarded)
    except ValueError:
        address = None
    # A zone ("fe80::1%eth0") would carry free text into the label.
    if address is None or getattr(address, "scope_id", None) is not None:
        raise protocol.MessageError("bad_message", "forwarded_for is not an IP address")
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d is a.b.c.d
    return str(mapped or address)
