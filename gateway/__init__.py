"""The web gateway: serves the chat page and relays browsers' WebSockets to
the chat server over its TCP protocol.  ``create_app`` builds the app."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chatroom")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
