"""Per-connection deadlines in a heap, so the server's timers cost
O(expiring) work per loop turn, not O(connections).

Each client has at most one live entry: the earliest time it may need
attention (``Client.timer_at``).  Deadlines that move *later* (a member
spoke, so its idle ping is due later) are not touched: the old entry fires
early, the server finds nothing due and schedules the real next deadline
(lazy invalidation).  Deadlines that move *earlier* (a closing grace, a
frame begun, a throttled client's wake-up) are pushed with ``schedule``; the
entry they supersede is skipped when it is popped.
"""

from __future__ import annotations

import heapq
import itertools

from tcpserver.client_state import Client


class Deadlines:
    """A heap of (monotonic seconds, tie-breaker, client)."""

    __slots__ = ("_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Client]] = []
        self._order = itertools.count()  # clients never compare

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, client: Client, when: float | None) -> None:
        """Make sure the client is looked at no later than ``when``
        (seconds on the ``time.monotonic`` clock); None: nothing to do."""
        if when is not None and when < client.timer_at:
            client.timer_at = when
            heapq.heappush(self._heap, (when, next(self._order), client))

    def reschedule(self, client: Client, when: float) -> None:
        """Move the client's deadline to ``when``, later or earlier: its old
        entry becomes stale and costs only a pop.  For a deadline known to
        move much later (a client that joined no longer has a hello timeout),
        so that it is not woken for nothing."""
        if when != client.timer_at:
            client.timer_at = when
            heapq.heappush(self._heap, (when, next(self._order), client))

    def next_time(self) -> float | None:
        """The earliest entry's time (it may be a stale one), or None."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Client]:
        """Live clients whose deadline is at or before ``now``, earliest
        first.  Their ``timer_at`` is reset: the caller schedules the next."""
        heap, due = self._heap, []
        while heap and heap[0][0] <= now:
            when, _, client = heapq.heappop(heap)
            if client.closed or when != client.timer_at:
                continue  # superseded by an earlier entry, or gone
            client.timer_at = float("inf")
            due.append(client)
        return due
