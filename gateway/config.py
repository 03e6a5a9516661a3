"""The gateway's settings: one frozen dataclass, and the command line that fills it."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field

from yarl import URL

from tcpserver import cli, protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A family or a small office shares one address; 8 tabs is generous for a
# person and still stops one host from holding hundreds of room seats.
DEFAULT_MAX_SESSIONS_PER_IP = 8
# Frames waiting for a slow browser.  The room sends at most a few events a
# second per member; 1000 is minutes of backlog for a healthy tab, and at
# 64 KiB a frame still bounds the memory of one stalled session.
DEFAULT_QUEUE_SIZE = 1000
# aiohttp pings the browser this often and drops it if no pong comes within
# half of it: a closed laptop lid frees its room seat within ~45 s.
DEFAULT_HEARTBEAT = 30.0
# Matches the chat server's own hello timeout: a tab that never joins does
# not hold one of its address's sessions forever.
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# A health probe is a loopback round trip; a second means the server is stuck.
DEFAULT_HEALTH_TIMEOUT = 1.0
# One probe per second at most, however often /health is polled.
DEFAULT_HEALTH_CACHE = 1.0


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``create_app`` needs; tests build one directly."""

    chat_host: str = "127.0.0.1"
    chat_port: int = 10000
    host: str = "127.0.0.1"
    http_port: int = 8080
    # Peers whose X-Forwarded-For is believed (reverse proxies in front of us).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Extra origins allowed to open /ws, normalised "scheme://host[:port]".
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    # Host names (or IP literals) the gateway answers to besides its bind
    # address and loopback; see policy.ServedHosts.  Normalised by
    # normalize_server_name.
    server_names: frozenset[str] = field(default_factory=frozenset)
    max_sessions_per_ip: int = DEFAULT_MAX_SESSIONS_PER_IP
    # Largest WebSocket message accepted: the chat server's frame limit, so
    # anything the browser may send also fits in one frame.
    max_frame: int = protocol.MAX_FRAME_SIZE
    queue_size: int = DEFAULT_QUEUE_SIZE
    # permessage-deflate (RFC 7692) for browsers that offer it.  Off: its
    # zlib streams cost ~150 KiB a session and more CPU than the relay.
    ws_deflate: bool = False
    heartbeat: float = DEFAULT_HEARTBEAT
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    health_cache: float = DEFAULT_HEALTH_CACHE
    # Processes serving the HTTP port together (SO_REUSEPORT); see
    # gateway.workers.  Every limit above is per process.
    workers: int = 1

    @property
    def chat_address(self) -> str:
        """The chat server as "host:port" (IPv6 hosts bracketed)."""
        host = f"[{self.chat_host}]" if ":" in self.chat_host else self.chat_host
        return f"{host}:{self.chat_port}"


def normalize_origin(origin: str) -> str:
    """Return ``origin`` as lower-case "scheme://host[:port]" with no path.

    Raises ValueError if it is not an http(s) origin.
    """
    url = URL(origin.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"not an http(s) origin: {origin!r}")
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = url.explicit_port
    default = 80 if url.scheme == "http" else 443
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{url.scheme}://{netloc}".lower()


def normalize_server_name(name: str) -> str:
    """Return ``name`` as the gateway compares it with a Host header.

    A DNS name comes back lower-case ASCII (IDNA, as browsers send it)
    without a trailing dot; an IP literal (IPv6 with or without brackets)
    in ``ipaddress``'s canonical form.  Raises ValueError for a name with a
    port, a scheme or characters a host name cannot hold.
    """
    text = name.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    try:
        ascii_name = text.encode("idna").decode("ascii").lower().rstrip(".")
    except UnicodeError:
        raise ValueError(f"--server-name {name!r} is not a host name") from None
    labels = ascii_name.split(".")
    if not ascii_name or not all(label and all(c.isalnum() or c in "-_" for c in label)
                                 for label in labels):
        raise ValueError(f"--server-name {name!r} is not a host name "
                         "(give the name alone, without scheme or port)")
    return ascii_name


def build_parser() -> cli.Parser:
    parser = cli.Parser(
        prog="python -m gateway",
        description="Web gateway: serves the chat page and relays WebSockets "
        "to the chat server over TCP.",
    )
    parser.add_argument("--http-port", type=cli.port, default=8080,
                        help="HTTP port to serve on (default 8080; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--chat-host", default="127.0.0.1",
                        help="chat server address (default 127.0.0.1)")
    parser.add_argument("--chat-port", type=cli.port, default=10000,
                        help="chat server port (default 10000)")
    parser.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                        help="reverse proxy whose X-Forwarded-For or Forwarded is believed; "
                        "repeatable (default: none)")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                        help="another origin allowed to open /ws, e.g. "
                        "https://chat.example.com; repeatable (default: same host only)")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="a host name (or address) browsers use to reach the gateway, "
                        "e.g. chat.example.com; repeatable.  Requests for other names "
                        "are refused (DNS-rebinding guard).  Always served: the --host "
                        "address, localhost, loopback addresses, --allowed-origin hosts, "
                        "and any address when --host is 0.0.0.0 or ::")
    parser.add_argument("--max-sessions-per-ip", type=int,
                        default=DEFAULT_MAX_SESSIONS_PER_IP,
                        help=f"concurrent sessions per client address "
                        f"(default {DEFAULT_MAX_SESSIONS_PER_IP})")
    parser.add_argument("--max-frame", type=int, default=protocol.MAX_FRAME_SIZE,
                        help="largest message in bytes; match the chat server's "
                        f"--max-frame (default {protocol.MAX_FRAME_SIZE})")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help="frames held for a slow browser: when more arrive while "
                        "this many still wait, its session is closed with 1013 "
                        f"(default {DEFAULT_QUEUE_SIZE})")
    parser.add_argument("--ws-deflate", action="store_true",
                        help="compress WebSocket messages (permessage-deflate, RFC 7692) "
                        "for browsers that offer it: fewer bytes on the wire, at ~150 KiB "
                        "of memory a session and more CPU than the relay itself "
                        "(default off)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the HTTP port (SO_REUSEPORT); "
                        "one per core the chat server leaves free (default 1)")
    # Set by a --workers parent for its children: which worker this is.
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser


def _named(option: str, parse, text: str, **kwargs):
    """``parse(text, **kwargs)``, its ValueError prefixed with ``option``."""
    try:
        return parse(text, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Build a GatewayConfig from parsed options.

    Raises ValueError for a bad CIDR, origin, server name or limit; its
    message starts with the option's name.
    """
    for option in ("max_sessions_per_ip", "max_frame", "queue_size", "workers"):
        if getattr(args, option) <= 0:
            raise ValueError(f"--{option.replace('_', '-')} must be positive")
    if not 0 <= args.http_port <= 65535:
        raise ValueError("--http-port must be 0-65535")
    if not 1 <= args.chat_port <= 65535:  # 0 picks a port to listen on, not one to reach
        raise ValueError("--chat-port must be 1-65535")
    return GatewayConfig(
        chat_host=args.chat_host,
        chat_port=args.chat_port,
        host=args.host,
        http_port=args.http_port,
        trusted_proxies=tuple(_named("--trusted-proxy", ipaddress.ip_network, c, strict=False)
                              for c in args.trusted_proxy),
        allowed_origins=frozenset(_named("--allowed-origin", normalize_origin, o)
                                  for o in args.allowed_origin),
        server_names=frozenset(normalize_server_name(n) for n in args.server_name),
        max_sessions_per_ip=args.max_sessions_per_ip,
        max_frame=args.max_frame,
        queue_size=args.queue_size,
        ws_deflate=args.ws_deflate,
        workers=args.workers,
    )
