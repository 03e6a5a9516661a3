"""``python -m gateway``: the web gateway alone, in front of a running chat server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from gateway import app, workers
from gateway.config import GatewayConfig, build_parser, config_from_args

log = logging.getLogger("gateway")


async def serve(config: GatewayConfig, worker: int | None = None) -> int:
    """Serve until SIGINT or SIGTERM; return the exit code (0 clean, 1 not started).

    As worker ``worker`` of a ``--workers`` parent, say so on stdout once
    listening (``gateway.workers``).
    """
    try:
        runner, _url = await app.start(config)
    except OSError as exc:
        log.error("%s", app.bind_error(config.host, config.http_port, exc))
        return 1
    log.info("answering to Host: %s (add names with --server-name)",
             runner.app[app.SERVED].describe())
    if worker is not None:
        os.write(sys.stdout.fileno(), workers.READY)
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # one usage line, exit 2, like a bad --http-port
    who = "" if args.worker is None else f"[worker {args.worker}] "
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {who}%(name)s %(levelname)s %(message)s")
    if config.workers > 1 and args.worker is None:
        return workers.run(config, argv)
    try:
        return asyncio.run(serve(config, args.worker))
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
