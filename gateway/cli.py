"""The ``chatroom`` command, in the book's style.

* ``chatroom --name=server --port=N`` runs the chat server;
* ``chatroom --name=bob --port=N`` runs a terminal client named bob;
* ``chatroom`` alone runs the chat server and the web gateway together
  (``gateway.launcher``), restarting the server if it dies.

The first two are ``tcpserver``'s own (``python -m tcpserver`` runs them
without the gateway); this module only adds the third.  ``python -m
gateway.cli`` is the same command.
"""

from __future__ import annotations

import logging
import sys

from tcpserver import cli, settings

DEFAULT_HTTP_PORT = 8080


def build_parser() -> cli.Parser:
    parser = cli.Parser(
        prog=cli.prog_name("gateway.cli", "chatroom"),
        description="A chat room: --name=server runs the server, --name=NAME "
        "joins as NAME from this terminal, no --name runs server and web "
        "gateway together.",
    )
    cli.add_common_arguments(parser)
    parser.add_argument("--http-port", type=cli.port, default=DEFAULT_HTTP_PORT,
                        help="web gateway port when run without --name "
                        f"(default {DEFAULT_HTTP_PORT}; 0 picks a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run what it names, return the exit code
    (2 for a usage error such as ``--port=99999``, or an option the chosen
    mode does not use, such as ``--name=bob --redis=URL``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cli.check_mode(parser, args, argv, gateway_options=frozenset({"http_port"}))
    cli.check_options(parser, args)
    if args.name is not None:
        return cli.run(args)
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


if __name__ == "__main__":
    sys.exit(main())
