"""The server's listening socket: accepting within a time budget per loop
turn, and pausing while the process is out of descriptors."""

from __future__ import annotations

import errno
import ipaddress
import logging
import selectors
import socket
import time
from typing import Iterator

log = logging.getLogger("tcpserver.server")

# A connect burst fills the accept queue in microseconds; the book's 5 drops
# connections under load.  The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096
# Time one loop turn may spend accepting (or refusing) connections: a
# connect flood then costs the members a bounded slice of each turn, not a
# stall, while a join storm still drains the kernel's accept queue before it
# overflows (an overflowing queue drops SYNs, which clients retry only after
# 1 s, then 3 s, ...).  The rest wait in the queue for the next turn.
ACCEPT_BUDGET_S = 0.005


class Listener:
    """A non-blocking TCP listening socket on ``host``:``port``, watched by
    ``selector`` for reading under the key data ``tag``.

    ``address`` is the (host, port) bound, so port 0 works in tests.
    Raises OSError if it cannot bind.
    """

    def __init__(self, host: str, port: int, selector: selectors.BaseSelector,
                 tag: object) -> None:
        self.sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG,
                                         family=_family(host), reuse_port=False)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self._selector = selector
        self._tag = tag
        selector.register(self.sock, selectors.EVENT_READ, tag)
        self.paused_until = 0.0  # monotonic seconds; 0: not paused

    def accept(self, now: float) -> Iterator[tuple[socket.socket, str]]:
        """Yield (socket, peer IP) for each waiting connection, for at most
        ACCEPT_BUDGET_S, counting the caller's work on each.  Out of
        descriptors, it stops watching the socket for 1 s from ``now``."""
        # One readiness event may stand for thousands of connections during
        # a connect burst; take them for at most ACCEPT_BUDGET_S, then serve
        # the members.  The listener stays readable: the next turn goes on.
        deadline = time.monotonic() + ACCEPT_BUDGET_S
        while time.monotonic() < deadline:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener would stay readable and
                    # spin the loop, so stop watching it for a moment.
                    log.warning("accept paused for 1 s: %s", exc)
                    self._selector.unregister(self.sock)
                    self.paused_until = now + 1.0
                    return
                log.info("accept failed: %s", exc)  # e.g. ECONNABORTED
                continue
            yield sock, addr[0]

    def resume_if_due(self, now: float, stopping: bool) -> None:
        """End a pause that is over: watch the socket again, unless the
        server is stopping (it closed the socket)."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            if not stopping:
                self._selector.register(self.sock, selectors.EVENT_READ, self._tag)

    def stop(self) -> None:
        """No more connections: stop watching the socket and close it."""
        if not self.paused_until:
            self._selector.unregister(self.sock)
        self.sock.close()

    def close(self) -> None:
        """Close the socket (the selector may be closed already)."""
        self.sock.close()


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name: create_server resolves it
