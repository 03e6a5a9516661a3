"""The server's limits: named defaults, command-line options, validation."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from tcpserver import protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback is trusted by default so that the web gateway, which runs on the
# same machine, can forward its browsers' real addresses.
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")


# --db :memory: keeps events in memory only, nothing across restarts.
MEMORY_DB = ":memory:"
# Events kept on disk: about 205-216 MB of 100-byte messages (README), enough
# for months of a busy room; pruning keeps the file from growing past it.
DEFAULT_RETAIN_EVENTS = 1_000_000
# --room goes inside a Redis Cluster hash tag ({ROOM}) in every key, so it
# may not hold braces; ':' separates the parts of a key.
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def default_db_path() -> Path:
    """The per-user state file: ``$XDG_STATE_HOME/chatroom/room.db``, or
    ``~/.local/state/chatroom/room.db`` (XDG Base Directory spec: a relative
    XDG_STATE_HOME is ignored)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "chatroom" / "room.db"


@dataclass(frozen=True)
class Storage:
    """Where the room log lives and how much of it is kept."""
    # A file path, or MEMORY_DB.
    db: str
    # Most events held (older ones are pruned, oldest first).
    retain_events: int = DEFAULT_RETAIN_EVENTS
    # Events older than this many days are pruned; 0: no age limit.
    retain_days: float = 0.0

    @property
    def in_memory(self) -> bool:
        return self.db == MEMORY_DB


# A welcome with a long label and a few members must still fit in a frame.
MIN_FRAME = 1024


@dataclass(frozen=True)
class Limits:
    # Largest frame payload accepted or sent.
    max_frame: int = protocol.MAX_FRAME_SIZE
    # Connections of any state.  Redis defaults to 10000; each idle client
    # here costs a few KiB, so the descriptor limit binds first.
    max_clients: int = 10_000
    # Enough for a household behind one NAT, few enough that one host
    # cannot take the room's seats.  A trusted proxy's connections count
    # under the addresses it forwards, never under its own.
    max_per_ip: int = 32
    # Connections from trusted proxies that have not said hello yet: they
    # are not counted per address until hello, so they get a bound of their
    # own.  Half of max_clients: a proxy's bug cannot take every seat, and a
    # reconnect storm of thousands of browsers through one gateway (which
    # connects before the browser's hello arrives) still fits.  Loopback is
    # trusted by default, so a bulk load from this host meets it too.
    max_pending_proxied: int = 5000
    # A real client says hello at once; 10 s allows for a slow mobile link.
    hello_timeout: float = 10.0
    # Silence for half of this draws a ping; for all of it, a disconnect.
    # A ping every 90 s is in IRC servers' usual range (90-180 s) and costs
    # 10,000 silent members about 110 round trips a second; a dead link
    # rarely matters sooner, since a reconnect takes its name back (resume).
    idle_timeout: float = 180.0
    # A frame begun must be finished this soon, so a trickle of bytes
    # cannot hold a connection and a buffer forever.
    frame_timeout: float = 15.0
    # Token bucket: a person types well under 10 messages a second; a
    # burst of 30 absorbs pastes and reconnect catch-up.  Frames over the
    # rate are not refused: they wait their turn (IRC's "fake lag").
    msg_rate: float = 10.0
    msg_burst: int = 30
    # Input waiting for the rate limit may hold this many seconds' worth of
    # frames (msg_rate * flood_seconds: 300) before the client is cut off
    # for flooding.  A stall bunches a polite sender's frames (a 60 s stall
    # at 5 a second is 300); a flooder's backlog grows until it passes.
    flood_seconds: float = 30.0
    # Output backlog past which a client is evicted as a slow reader; this
    # also bounds the shared room buffer.
    slow_reader_bytes: int = 1024 * 1024
    # Room events replayed after a welcome, and kept in memory for it.
    history: int = 100
    # Most events one ``history after`` request replays (PROTOCOL.md); a
    # reconnect after a long absence is told how many it missed instead.
    history_replay: int = 1000
    # Above this many members the room is "large": join/leave notices stop,
    # presence counts instead, member lists are paged (Twitch stops join and
    # part notices at 1000 users).
    announce_limit: int = 1000
    # How long shutdown waits for clients to take their last bytes.
    shutdown_grace: float = 5.0

    @property
    def flood_frames(self) -> int:
        """Frames that may wait for the rate limit before it is flooding:
        ``msg_rate * flood_seconds``, at least 1."""
        return max(1, int(self.msg_rate * self.flood_seconds))


# (option, Limits field, type, help)
_OPTIONS = (
    ("--max-frame", "max_frame", int, "largest frame payload in bytes"),
    ("--max-clients", "max_clients", int, "most connections at once"),
    ("--max-per-ip", "max_per_ip", int, "most connections from one address"),
    ("--max-pending-proxied", "max_pending_proxied", int,
     "most connections from trusted proxies waiting for hello"),
    ("--hello-timeout", "hello_timeout", float, "seconds to send hello"),
    ("--idle-timeout", "idle_timeout", float, "seconds of silence before disconnect"),
    ("--frame-timeout", "frame_timeout", float, "seconds to finish a frame once begun"),
    ("--msg-rate", "msg_rate", float, "messages per second per client"),
    ("--msg-burst", "msg_burst", int, "burst allowance of the rate limit"),
    ("--flood-seconds", "flood_seconds", float,
     "seconds input may wait for the rate limit without catching up before disconnect"),
    ("--slow-reader-bytes", "slow_reader_bytes", int, "output backlog before eviction"),
    ("--history", "history", int, "room events replayed after a welcome"),
    ("--history-replay", "history_replay", int, "most events one history request replays"),
    ("--announce-limit", "announce_limit", int,
     "members above which join/leave notices stop and lists are paged"),
    ("--shutdown-grace", "shutdown_grace", float, "seconds to flush on shutdown"),
)


def add_arguments(group: argparse._ActionsContainer) -> None:
    """Add the server's options (limits, backend, trusted proxies) to a parser."""
    defaults = Limits()
    for option, field, kind, text in _OPTIONS:
        group.add_argument(option, dest=field, type=kind, default=getattr(defaults, field),
                           help=f"{text} (default {getattr(defaults, field)})")
    group.add_argument("--backend", default="auto", choices=["auto", "select", "poll", "epoll"],
                       help="selector backend; auto is the platform's best (epoll on Linux)")
    group.add_argument("--trusted-proxy", action="append", default=None, metavar="ADDR",
                       help="address or CIDR whose forwarded client address is honoured; "
                       "repeatable (default: loopback)")
    group.add_argument("--db", default=None, metavar="PATH",
                       help="room log database (SQLite) file, or :memory: to keep nothing "
                       "across restarts (default $XDG_STATE_HOME/chatroom/room.db, else "
                       "~/.local/state/chatroom/room.db)")
    group.add_argument("--retain-events", type=int, default=None, metavar="N",
                       help=f"most room events kept (default {DEFAULT_RETAIN_EVENTS} in a "
                       "database; --history with --db :memory:)")
    group.add_argument("--retain-days", type=float, default=0.0, metavar="D",
                       help="prune events older than D days (default 0: no age limit)")
    group.add_argument("--metrics-port", type=metrics_port, default=None, metavar="PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST "
                       "being --host (default: off; 0 picks a free port)")
    group.add_argument("--redis", default=None, metavar="URL",
                       help="keep the room in Redis at redis://HOST:PORT/DB, shared with "
                       "every server given the same URL and --room (default: this process only)")
    group.add_argument("--room", default="main", metavar="NAME",
                       help="the room's name in Redis (default main)")


def metrics_port(text: str) -> int:
    """argparse type for --metrics-port: an int in 0..65535; raises
    argparse.ArgumentTypeError otherwise (a usage error, exit 2)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def limits_from_args(args: argparse.Namespace) -> Limits:
    """Build Limits from parsed options; raise ValueError if one is out of range."""
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    for f in fields(Limits):
        if not 0 < getattr(limits, f.name) < math.inf:  # also refuses nan and inf
            raise ValueError(f"--{f.name.replace('_', '-')} must be a positive number")
    if limits.max_frame < MIN_FRAME:
        raise ValueError(f"--max-frame must be at least {MIN_FRAME}")
    return limits


def storage_from_args(args: argparse.Namespace, limits: Limits) -> Storage:
    """Build Storage from parsed options; raise ValueError if one is out of range."""
    db = args.db if args.db is not None else str(default_db_path())
    if not db:
        raise ValueError("--db must name a file (or :memory:)")
    retain = args.retain_events
    if retain is None:
        retain = limits.history if db == MEMORY_DB else DEFAULT_RETAIN_EVENTS
    if retain <= 0:
        raise ValueError("--retain-events must be positive")
    if not 0 <= args.retain_days < math.inf:  # also refuses nan
        raise ValueError("--retain-days must be 0 (no age limit) or positive")
    return Storage(db, retain, args.retain_days)


def trusted_networks(args: argparse.Namespace) -> tuple[IPNetwork, ...]:
    """Parse --trusted-proxy values; raise ValueError for a bad address."""
    values = args.trusted_proxy if args.trusted_proxy is not None else DEFAULT_TRUSTED_PROXIES
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as exc:
        raise ValueError(f"--trusted-proxy: {exc}") from None


def check_room(room: str) -> None:
    """Raise ValueError naming --room unless ``room`` matches ROOM_NAME."""
    if not ROOM_NAME.fullmatch(room):
        raise ValueError(f"--room: the room name {room!r} is not 1-64 letters, digits, "
                         "'-', '_' or '.'")


def check_server_options(args: argparse.Namespace) -> None:
    """Check every server option a parser took (ranges, addresses, the
    Redis URL, the room name) before anything starts; raise ValueError
    naming the option, so a command line can report it as a usage error
    (exit 2).  --room is checked even without --redis: a bad value is
    refused, never carried along unused."""
    limits = limits_from_args(args)
    trusted_networks(args)
    storage_from_args(args, limits)
    check_room(args.room)
    if getattr(args, "redis", None):
        from tcpserver.resp import RedisAddress

        try:
            RedisAddress(args.redis)
        except ValueError as exc:
            raise ValueError(f"--redis: {exc}") from None


def arguments_to_argv(args: argparse.Namespace) -> list[str]:
    """The server options in ``args`` that differ from their defaults, as argv.

    Lets ``chatroom`` (server plus gateway) pass them on to the server
    process.  Generic over whatever ``add_arguments`` adds: each option is
    given as ``--opt=value`` (a repeatable one once per value, a flag bare),
    so a new server option passes through with no change here.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    argv = []
    for action in parser._actions:  # argparse has no public list of them
        value = getattr(args, action.dest, action.default)
        if value == action.default or not action.option_strings:
            continue
        option = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true and the like
            argv.append(option)
        elif isinstance(value, list):
            argv.extend(f"{option}={item}" for item in value)
        else:
            argv.append(f"{option}={value}")
    return argv
