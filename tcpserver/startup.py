"""Starting the chat server from the command line: options to a running
``ChatServer`` with its room log and metrics, each failure one log line.

``main`` is what ``chatroom --name=server`` runs; ``open_roomlog`` picks the
room log the options name (SQLite, memory or Redis).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys

from tcpserver import settings
from tcpserver.metrics import MetricsServer, registry_for
from tcpserver.roomlog import MemoryLog, RoomLog, StorageError
from tcpserver.server import ChatServer

log = logging.getLogger("tcpserver.server")


def main(args: argparse.Namespace) -> int:
    """Run the server from parsed ``chatroom`` options; return the exit code."""
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        limits = settings.limits_from_args(args)
        trusted = settings.trusted_networks(args)
        storage = settings.storage_from_args(args, limits)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    _raise_descriptor_limit(limits.max_clients + 64)
    try:
        roomlog = open_roomlog(storage, limits, args.redis, args.room)
    except StorageError as exc:
        log.error("%s", exc)
        return 1
    try:
        server = ChatServer(args.host, args.port, limits, args.backend, trusted, roomlog)
    except (OSError, ValueError) as exc:
        roomlog.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.error("cannot listen on %s:%d: %s", args.host, args.port, reason)
        return 1
    metrics = None
    if args.metrics_port is not None:
        try:
            metrics = MetricsServer(registry_for(server.stats, lambda: len(server.streaming)),
                                    args.host, args.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", args.host, args.metrics_port,
                      exc.strerror or exc)
            server.selector.close()
            server.listener.close()
            server.log.close()
            return 1
    try:
        return server.serve_forever(watch_stdin=_interactive_stdin())
    finally:
        if metrics is not None:
            metrics.close()


def open_roomlog(storage: settings.Storage, limits: settings.Limits,
                 redis: str | None = None, room: str = "main") -> RoomLog:
    """The room log: RedisLog for ``--redis URL`` (room ``room``), else the
    one ``storage`` names: MemoryLog for ``:memory:``, else SqliteLog.
    Raises StorageError (one line) if the file or Redis cannot be used."""
    if redis:
        from tcpserver.redislog import RedisLog

        try:
            return RedisLog(redis, room, limits.max_frame,
                            max(limits.history, limits.history_replay), storage.retain_events)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot use Redis at {redis}: {exc}") from None
    if storage.in_memory:
        return MemoryLog(limits.max_frame, limits.history, storage.retain_events)
    from tcpserver.sqlitelog import SqliteLog

    return SqliteLog(storage.db, limits.max_frame, limits.history, storage.retain_events,
                     storage.retain_days)


def _interactive_stdin() -> bool:
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False


def _raise_descriptor_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.debug("descriptor limit raised from %d to %d", soft, target)
