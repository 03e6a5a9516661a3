"""``python -m gateway``: the web gateway alone, in front of a running chat server."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import sys

from gateway import app
from gateway.config import GatewayConfig, build_parser, config_from_args

log = logging.getLogger("gateway")


async def serve(config: GatewayConfig) -> int:
    """Serve until SIGINT or SIGTERM; return the exit code (0 clean, 1 not started)."""
    try:
        runner, _url = await app.start(config)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("HTTP port %d is busy", config.http_port)
        else:
            log.error("cannot serve on %s:%d: %s", config.host, config.http_port,
                      exc.strerror or exc)
        return 1
    log.info("answering to Host: %s (add names with --server-name)",
             runner.app[app.SERVED].describe())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, serve, return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        return asyncio.run(serve(config))
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
