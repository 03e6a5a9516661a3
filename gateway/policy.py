"""Who is asking, and may they: the real client address, the Host, the Origin.

Pure functions of request data, so they are unit-tested without sockets.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

from gateway.config import IPNetwork, normalize_origin

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Bind addresses that mean "every interface" (aiohttp treats "" the same).
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


# --- addresses ---------------------------------------------------------------

def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_port(text: str) -> bool:
    # RFC 7239 node-port and RFC 3986 port: 1 to 5 ASCII digits, and a
    # TCP port besides.
    return 1 <= len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def parse_node(text: str) -> IPAddress | None:
    """Return the address in one forwarded-address entry, port dropped.

    Accepts ``203.0.113.1``, ``203.0.113.1:51001``, ``2001:db8::2``,
    ``[2001:db8::2]`` and ``[2001:db8::2]:51002`` (the forms proxies write
    in X-Forwarded-For, and RFC 7239 §6 ``node`` once unquoted).  Returns
    None for anything else, including RFC 7239's ``unknown`` and
    obfuscated ``_name`` identifiers.  Never raises.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        return _ip(text[1:end])
    if text.count(":") == 1:
        # Exactly one colon is "IPv4:port"; IPv6 always has two or more.
        host, port = text.split(":")
        if not _is_port(port):
            return None
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            return None
    return _ip(text)


def _trusted(ip: IPAddress, trusted: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


# RFC 7230 §3.2.6 token and quoted-string, as RFC 7239 §4 uses them.  OWS is
# allowed around ";" too, which the RFC does not, because real proxies
# write "for=192.0.2.1; proto=https".
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def _skip_element(value: str, pos: int) -> int:
    """Index of the next comma outside a quoted string, or len(value)."""
    quoted = False
    while pos < len(value):
        char = value[pos]
        if quoted and char == "\\":
            pos += 1
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            return pos
        pos += 1
    return pos


def forwarded_elements(values: Iterable[str]) -> list[dict[str, str] | None]:
    """Parse ``Forwarded`` header values (RFC 7239 §4) into elements.

    Returns one dict per forwarded-element, left to right, mapping
    lower-case parameter names to unquoted values (``for=`` is the one the
    gateway reads); None stands for an element that is malformed or repeats
    a parameter (§4: "MUST NOT occur more than once"), so a caller can stop
    there.  Empty list elements are skipped (RFC 7230 §7).  Never raises.
    """
    value = ",".join(values)
    elements: list[dict[str, str] | None] = []
    current: dict[str, str] = {}
    good = True
    pos = 0
    while True:
        match = _PAIR.match(value, pos)
        if match:
            name = match[1].lower()
            good = good and name not in current
            raw = match[2]
            current[name] = (_QUOTED_PAIR.sub(r"\1", raw[1:-1]) if raw.startswith('"')
                             else raw)
            pos = match.end()
        else:
            while pos < len(value) and value[pos] in " \t":
                pos += 1
        if pos < len(value) and value[pos] == ";":
            pos += 1
            continue
        if pos < len(value) and value[pos] != ",":
            good = False
            pos = _skip_element(value, pos)
        if not good:
            elements.append(None)
        elif current:
            elements.append(current)
        if pos >= len(value):
            return elements
        current, good = {}, True
        pos += 1  # past the comma


def _hidden(node: str) -> bool:
    # RFC 7239 §6.2-6.3: "unknown" and obfuscated "_name" identifiers, with
    # or without a port; a proxy chose not to say who the client is.
    return node.lower().split(":")[0] == "unknown" or node.startswith("_")


def client_address(peer: str | None, forwarded_for: Iterable[str],
                   trusted: Iterable[IPNetwork],
                   forwarded: Iterable[str] = ()) -> str | None:
    """Return the browser's real IP address as a string, or None if unknown.

    ``peer`` is the TCP peer; ``forwarded_for`` the X-Forwarded-For header
    values in order, ``forwarded`` the RFC 7239 ``Forwarded`` values.  The
    headers are believed only when the peer is a trusted proxy, and then
    only as far as trusted hops go: the answer is the rightmost entry that
    is not itself trusted, because entries left of it were written by the
    client and can be forged.  Ports are dropped (``parse_node``).

    X-Forwarded-For wins when it has any entry; ``Forwarded`` is read only
    when it is absent.  Nearly every proxy writes X-Forwarded-For and passes
    a client's own Forwarded header through untouched, so preferring
    Forwarded would let any client choose its address behind them.

    An entry that is garbage, ``unknown``, obfuscated or (in Forwarded) has
    no ``for=`` stops the walk: the last trusted hop is the best we know.
    Never raises.
    """
    trusted = tuple(trusted)
    ip = _ip(peer.strip()) if peer else None
    if ip is None:
        return None
    if not _trusted(ip, trusted):
        return str(ip)
    hops = [entry.strip() for value in forwarded_for for entry in value.split(",")
            if entry.strip()]
    header = "X-Forwarded-For"
    if not hops:
        header = "Forwarded"
        hops = [element.get("for") if element else None
                for element in forwarded_elements(forwarded)]
    for entry in reversed(hops):
        hop = parse_node(entry) if entry is not None else None
        if hop is None:
            # Nothing a hop we trust vouched for: stop at the last trusted
            # address rather than believe anything further left.
            if entry is not None and _hidden(entry):
                log.debug("%s names a hidden client %r", header, entry[:60])
            else:
                log.info("ignored bad %s entry %r", header, (entry or "")[:60])
            return str(ip)
        ip = hop
        if not _trusted(ip, trusted):
            return str(ip)
    # Every hop is a trusted proxy: the leftmost is the best we know.
    return str(ip)


# --- Host: the names the gateway answers to ---------------------------------

_REG_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def parse_host(value: str) -> str | IPAddress | None:
    """Return the host of a ``Host`` header value, port dropped.

    A name comes back lower-case without a trailing dot; an IP literal
    (IPv6 in brackets, RFC 3986 §3.2.2) as an address.  None if the value
    is not ``host[:port]`` (e.g. an unbracketed IPv6 address).  Never raises.
    """
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and (rest == ":" or _is_port(rest[1:])))):
            return None
        try:
            ip = ipaddress.IPv6Address(text[1:end])
        except ValueError:
            return None
        return ip.ipv4_mapped or ip
    host, colon, port = text.partition(":")
    # RFC 3986 allows an empty port after the colon.
    if colon and port and not _is_port(port):
        return None
    if host.endswith("."):
        host = host[:-1]  # "localhost." is the same name, fully qualified
    if not _REG_NAME.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return host


@dataclass(frozen=True)
class ServedHosts:
    """The names and addresses the gateway answers to (see ``served_hosts``)."""

    names: frozenset[str]
    addresses: frozenset[IPAddress]
    # Bound to a wildcard: any IP literal reaches us only by being ours.
    any_address: bool

    def allows(self, host: str | None, *, any_address: bool = False) -> bool:
        """True if a request whose Host header is ``host`` is for us.

        The defence against DNS rebinding (RFC 6455 §10.2 leaves origin
        policy to the server; the origin model is RFC 6454): an attacker's
        page at ``http://rebind.example:PORT`` whose name later resolves to
        127.0.0.1 is same-origin *to the browser*, so its Origin equals its
        Host and the Origin check passes.  Only its Host, a name we do not
        serve, gives it away.

        Allowed: no Host at all (HTTP/1.0 tools; browsers always send it);
        loopback literals (127.0.0.0/8, ::1) and ``localhost``, with or
        without a port; ``names`` and ``addresses``; any IP literal if
        ``self.any_address`` or ``any_address``.  An IP literal cannot be a
        rebinding, which needs a name the attacker controls.  Never raises.
        """
        if host is None:
            return True
        parsed = parse_host(host)
        if parsed is None:
            return False
        if isinstance(parsed, str):
            return parsed == "localhost" or parsed in self.names
        return (parsed.is_loopback or parsed in self.addresses
                or self.any_address or any_address)

    def describe(self) -> str:
        """The served hosts for a log line, e.g. "localhost, 127.0.0.0/8, ::1, chat.example.org"."""
        served = ["localhost", "127.0.0.0/8", "::1"]
        if self.any_address:
            served.append("any IP address")
        else:
            served += sorted(str(a) for a in self.addresses if not a.is_loopback)
        return ", ".join(served + sorted(self.names))


def served_hosts(bind_host: str, server_names: Iterable[str],
                 allowed_origins: Iterable[str]) -> ServedHosts:
    """Collect what the gateway answers to.

    ``bind_host`` is its ``--host`` (a wildcard admits every IP literal);
    ``server_names`` normalised names or IP literals (``--server-name``);
    ``allowed_origins`` normalised origins whose hosts are served as well,
    since a page there reaches us through a proxy passing its Host on.
    Never raises for values that ``config`` has normalised.
    """
    names: set[str] = set()
    addresses: set[IPAddress] = set()
    hosts = [*server_names, *(URL(origin).host or "" for origin in allowed_origins)]
    # A wildcard bind admits every address; a wildcard an operator lists
    # as a name (--server-name 0.0.0.0) is served like any other address.
    if bind_host not in WILDCARD_HOSTS:
        hosts.append(bind_host)
    for host in filter(None, hosts):  # an origin without a host names nothing
        ip = _ip(host.strip("[]"))
        if ip is not None:
            addresses.add(ip)
        else:
            names.add(host.lower().rstrip("."))
    return ServedHosts(frozenset(names), frozenset(addresses), bind_host in WILDCARD_HOSTS)


# --- Origin -------------------------------------------------------------------

def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """True if a WebSocket from ``origin`` may connect.  Never raises.

    Allowed: no Origin header at all (only browsers send one, and
    cross-site WebSocket hijacking needs a browser); an origin whose
    host[:port] equals the request's Host header; any origin in ``allowed``
    (normalised by ``config.normalize_origin``).  Refused: everything else,
    including ``Origin: null`` (sandboxed frames, file: pages).  Equal to
    the Host proves same-origin only once the Host is one we serve, which
    ``ServedHosts.allows`` checks first (RFC 6455 §10.2, §4.2.2).
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
