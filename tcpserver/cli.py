"""``python -m tcpserver``: the chat server or a terminal client, in the book's style.

* ``--name=server --port=N`` runs the chat server;
* ``--name=bob --port=N`` runs a terminal client named bob.

The ``chatroom`` command (``gateway.cli``) accepts the same two forms and
adds a third, no ``--name``, which runs the server with the web gateway.
This package never imports ``gateway``: the layers only look down.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from tcpserver import settings

DEFAULT_PORT = 10000
MAX_PORT = 65535


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: WHY
    (see --help)``), not the usage block first; the exit status stays 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def given(self, argv: list[str]) -> dict[str, str]:
        """The options ``argv`` gives explicitly, as {dest: option string},
        in the order given; an option given with its default value counts.

        Parses ``argv`` again with every default set to argparse.SUPPRESS,
        so only what the command line set reaches the namespace.  Call it
        after ``parse_args(argv)`` succeeded (a bad ``argv`` exits 2 here).
        """
        saved = [(action, action.default) for action in self._actions]
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            names = vars(self.parse_args(argv))
        finally:
            for action, default in saved:
                action.default = default
        options = {a.dest: max(a.option_strings, key=len) for a in self._actions
                   if a.option_strings}
        return {dest: options[dest] for dest in names}


def prog_name(module: str, script: str) -> str:
    """The command's name for usage and error lines, as it was invoked:
    ``script`` (a console script, e.g. ``chatroom-demo``) when ``sys.argv[0]``
    is that script, else ``python -m MODULE``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.splitext(invoked)[0] == script:  # chatroom-demo.exe on Windows
        return script
    return f"python -m {module}"


def port(text: str) -> int:
    """argparse type for a TCP port: an int in 0..65535 (0: pick a free one).

    Raises argparse.ArgumentTypeError otherwise, so a bad value is a usage
    error (exit 2), never an OverflowError from the socket layer.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-{MAX_PORT}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--name, --port, --host, --log-level and the server's options."""
    parser.add_argument("--name", help="'server', or your name to join as a client")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT,
                        help=f"chat server TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind, or server to connect to (default 127.0.0.1)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    settings.add_arguments(parser.add_argument_group("server options"))


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m tcpserver",
        description="A chat room: --name=server runs the server, --name=NAME "
        "joins as NAME from this terminal.  (`chatroom` with no --name runs "
        "the server and the web gateway together.)",
    )
    add_common_arguments(parser)
    return parser


# What a terminal client uses; every other option is the server's (or, for
# ``chatroom``, the web gateway's), and giving one to a client is a usage
# error rather than a silent no-op.  (--log-level too: the client's only
# log lines are its one-line errors.)
CLIENT_OPTIONS = frozenset({"name", "port", "host"})


def check_mode(parser: Parser, args: argparse.Namespace, argv: list[str],
               gateway_options: frozenset[str] = frozenset()) -> None:
    """Refuse options that do not apply to the mode ``--name`` chose, as one
    usage line naming them (exit 2).

    A client (``--name=NAME``) takes only CLIENT_OPTIONS; the server alone
    (``--name=server``) takes everything but ``gateway_options`` (dests of
    options for the web gateway, which only bare ``chatroom`` runs).  No
    ``--name``: everything applies.
    """
    if args.name is None:
        return
    given = parser.given(argv)
    if args.name == "server":
        wrong = [option for dest, option in given.items() if dest in gateway_options]
        why = ("the web gateway runs only with no --name; --name=server runs the "
               "chat server alone")
        mode = "the server (--name=server)"
    else:
        wrong = [option for dest, option in given.items() if dest not in CLIENT_OPTIONS]
        why = "a terminal client takes only --name, --port and --host"
        mode = f"a terminal client (--name={args.name})"
    if wrong:
        verb = "does" if len(wrong) == 1 else "do"
        parser.error(f"{', '.join(wrong)} {verb} not apply to {mode}: {why}")


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad server option values as usage errors: one line, exit 2."""
    try:
        settings.check_server_options(args)
    except ValueError as exc:
        parser.error(str(exc))


def run(args: argparse.Namespace) -> int:
    """Run the server (``--name=server``) or a client; return the exit code.

    ``args`` comes from a parser built with ``add_common_arguments``;
    ``args.name`` must not be None.
    """
    if args.name == "server":
        from tcpserver import startup

        return startup.main(args)
    from tcpserver import client

    return client.run(args.name, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    """``python -m tcpserver``: parse, run, return the exit code (2 for usage errors)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.name is None:
        parser.error("--name is required (server, or your name); run `chatroom` "
                     "with no --name for the server and the web gateway together")
    check_mode(parser, args, argv)
    check_options(parser, args)
    return run(args)
