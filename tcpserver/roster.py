"""This process's members: by name, in name order for paged ``who``, and
as the encoded member lists that welcomes and ``who`` replies carry.

No sockets: ``rules.Room`` owns a ``Roster`` and sends what it encodes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from tcpserver import protocol
from tcpserver.client_state import Client

# Room for the fields around a member list when packing it into frames.
MEMBERS_FRAME_SLACK = 512


class Roster:
    """Members by casefolded name, plus the names sorted (casefolded) so a
    page of ``who`` is a slice, not a sort.

    ``arrays()`` encodes the whole list once per loop turn: every welcome
    and ``who`` reply of the turn shares those bytes, so a burst of N joins
    holds one copy of the list, not N.  The room calls ``new_turn`` when the
    room stream moves on (its commit, a presence frame).
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._by_key: dict[str, Client] = {}
        self._keys: list[str] = []  # sorted
        self._arrays: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Client | None:
        """The member called ``key`` (casefolded), or None."""
        return self._by_key.get(key)

    def items(self) -> Iterator[tuple[str, Client]]:
        return iter(self._by_key.items())

    def values(self) -> Iterator[Client]:
        return iter(self._by_key.values())

    def add(self, key: str, client: Client) -> None:
        """Seat ``client`` under ``key`` (casefolded; not already held)."""
        self._by_key[key] = client
        bisect.insort(self._keys, key)

    def remove(self, key: str) -> None:
        """Unseat the member under ``key``; KeyError if there is none."""
        del self._by_key[key]
        del self._keys[bisect.bisect_left(self._keys, key)]

    def clear(self) -> None:
        self._by_key.clear()
        self._keys.clear()

    def page(self, prefix: str, cursor: str | None, limit: int) -> tuple[list[Client], bool]:
        """Up to ``limit`` members whose casefolded name starts with
        ``prefix`` (casefolded), after ``cursor`` (a casefolded name from an
        earlier page) if given, in name order; and whether more follow."""
        keys = self._keys
        start = bisect.bisect_left(keys, prefix)
        if cursor is not None:
            start = max(start, bisect.bisect_right(keys, cursor))
        page: list[Client] = []
        for i in range(start, min(start + limit, len(keys))):
            if not keys[i].startswith(prefix):
                break
            page.append(self._by_key[keys[i]])
        end = start + len(page)
        return page, end < len(keys) and keys[end].startswith(prefix)

    def arrays(self) -> list[bytes]:
        """Every member's label as encoded JSON arrays that each fit in a
        frame (``encode_arrays``), encoded once a turn.

        A copy from earlier in the turn is still right for a later joiner:
        whatever changed the list since is staged this turn, and reaches the
        joiner through the room stream after its list."""
        if self._arrays is None:
            self._arrays = encode_arrays([c.label for c in self._by_key.values()],
                                         self.max_frame)
        return self._arrays

    def new_turn(self) -> None:
        """The room stream moved on: the next list is encoded afresh."""
        self._arrays = None


def chunk_labels(labels: list[str], max_frame: int) -> list[list[str]]:
    """``labels`` split, in order, into lists that each fit in one frame of
    ``max_frame`` bytes with ``MEMBERS_FRAME_SLACK`` to spare (at least one
    list, maybe empty)."""
    budget = max_frame - MEMBERS_FRAME_SLACK
    chunks: list[list[str]] = [[]]
    size = 0
    for label in labels:
        cost = len(label.encode()) + 3  # quotes and comma
        if size + cost > budget and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(label)
        size += cost
    return chunks


def encode_arrays(labels: list[str], max_frame: int) -> list[bytes]:
    """``chunk_labels`` with each list encoded as a JSON array."""
    return [protocol.encode_payload(chunk) for chunk in chunk_labels(labels, max_frame)]
