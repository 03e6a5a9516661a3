"""A select() chat room: wire protocol, server and terminal client."""

__version__ = "0.1.0"
