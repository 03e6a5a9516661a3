"""The ``chatroom`` command, in the book's style.

* ``chatroom --name=server --port=N`` runs the chat server;
* ``chatroom --name=bob --port=N`` runs a terminal client named bob;
* ``chatroom`` alone runs the chat server and the web gateway together.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tcpserver import server, settings

DEFAULT_PORT = 10000
DEFAULT_HTTP_PORT = 8080


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatroom",
        description="A chat room: --name=server runs the server, --name=NAME "
        "joins as NAME from this terminal, no --name runs server and web "
        "gateway together.",
    )
    parser.add_argument("--name", help="'server', or your name to join as a client")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"chat server TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind, or server to connect to (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="web gateway port when run without --name "
                        f"(default {DEFAULT_HTTP_PORT})")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    settings.add_arguments(parser.add_argument_group("server limits"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.name == "server":
        return server.main(args)
    if args.name is not None:
        from tcpserver import client

        return client.run(args.name, args.host, args.port)
    # No name: the newcomer's one command, server plus web gateway.
    from gateway import launcher

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return launcher.run(
        host=args.host,
        chat_port=args.port,
        http_port=args.http_port,
        server_args=settings.arguments_to_argv(args),
        log_level=args.log_level,
    )
