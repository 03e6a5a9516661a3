"""Who is asking: the real client address, and whether its origin may connect.

Pure functions of request data, so they are unit-tested without sockets.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from gateway.config import IPNetwork, normalize_origin

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPAddress, trusted: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def client_address(peer: str | None, forwarded_for: Iterable[str],
                   trusted: Iterable[IPNetwork]) -> str | None:
    """Return the browser's real IP address as a string, or None if unknown.

    ``peer`` is the TCP peer; ``forwarded_for`` the X-Forwarded-For header
    values in order.  The header is believed only when the peer is a
    trusted proxy, and then only as far as trusted hops go: the answer is
    the rightmost entry that is not itself trusted, because entries left of
    it were written by the client and can be forged.  Never raises.
    """
    trusted = tuple(trusted)
    ip = _parse_ip(peer) if peer else None
    if ip is None:
        return None
    if not _trusted(ip, trusted):
        return str(ip)
    hops = [entry for value in forwarded_for for entry in value.split(",") if entry.strip()]
    for entry in reversed(hops):
        hop = _parse_ip(entry)
        if hop is None:
            # Garbage from a hop we cannot vouch for: stop at the last
            # trusted address rather than believe anything further left.
            log.info("ignored bad X-Forwarded-For entry %r", entry[:60])
            return str(ip)
        ip = hop
        if not _trusted(ip, trusted):
            return str(ip)
    # Every hop is a trusted proxy: the leftmost is the best we know.
    return str(ip)


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """True if a WebSocket from ``origin`` may connect.  Never raises.

    Allowed: no Origin header at all (only browsers send one, and
    cross-site WebSocket hijacking needs a browser); an origin whose
    host[:port] equals the request's Host header; any origin in ``allowed``
    (normalised by ``config.normalize_origin``).  Refused: everything else,
    including ``Origin: null`` (sandboxed frames, file: pages).
    """
    if origin is None:
        return True
    try:
        normal = normalize_origin(origin)
    except ValueError:
        return False
    if normal in allowed:
        return True
    if not host:
        return False
    netloc = normal.split("://", 1)[1]
    host = host.strip().lower()
    if netloc == host:
        return True
    # "Host: example.com:443" names the default port that Origin omits.
    default = ":443" if normal.startswith("https:") else ":80"
    return netloc + default == host
