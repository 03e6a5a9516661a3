"""Presence across every server of a room kept in Redis.

Keys (prefix ``chatroom:{ROOM}:``, shared with ``tcpserver.redislog``):

* ``names``  -- hash: casefolded name -> ``NODE\\nTOKEN\\nLABEL_JSON``
  (the node holding the member, its resume secret, its label as JSON);
* ``index``  -- sorted set of casefolded names, all score 0, for paged
  ``who`` by ``ZRANGEBYLEX`` (byte order = Unicode code point order);
* ``nodes``  -- set of node ids; ``node:ID:alive`` -- a key with a TTL
  (``PX``) that the node renews; ``node:ID:members`` -- the names it holds;
  ``node:ID:inbox`` -- stream of private frames (and take-back notices) for
  that node's members, read by the same ``XREAD`` as the room stream.

A name is claimed by one script (``CLAIM``), so two nodes cannot both give
it out; a resume token takes it back from any node.  Every ``REAP_EVERY``
seconds each node runs ``REAP``: for each registered node whose alive key
expired, it removes its members and publishes each one's ``leave``
(``hung_up``) through the same seq/``XADD`` logic as a ``say``, then
unregisters the node -- all in one script, so two survivors reaping at once
publish each leave once.  A node that reconnected to Redis waits
``REAP_GRACE`` before reaping, so that after a Redis restart every live
node has had time to renew its key; on reconnecting it re-asserts its
registration and members (``SYNC``: a ``join`` for any that were reaped, a
``leave`` for any that left while Redis was away), and so does a node whose
heartbeat finds it unregistered (it stalled past the TTL and was reaped).
A join storm costs one ``ROSTER`` (the member list) per loop turn, which
serves every welcome of that turn.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import Any, Callable

from tcpserver import protocol, resp
from tcpserver.presence import Claim, Presence
from tcpserver.redislog import RedisLog, Script
from tcpserver.redisscripts import CLAIM, REAP, RELEASE, ROSTER, SYNC, WHO
from tcpserver.roster import chunk_labels, encode_arrays
from tcpserver.rules import WHO_PAGE, WHO_PAGE_MAX, now_ms

log = logging.getLogger(__name__)

# The alive key lives this long unless renewed every HEARTBEAT seconds:
# a node that stops is noticed within NODE_TTL + REAP_EVERY (about 7 s).
NODE_TTL_MS = 5000
HEARTBEAT = 1.0
REAP_EVERY = 2.0
# After a reconnect, every live node needs up to one backoff to reconnect
# and renew its key before anyone may call it dead.
REAP_GRACE = resp.BACKOFF_MAX + NODE_TTL_MS / 1000
# Private frames kept per node inbox (MAXLEN ~): it is read at once.
INBOX_RETAIN = 10_000


def _label(value: bytes) -> str:
    return json.loads(value.split(b"\n", 2)[2])


class RedisPresence(Presence):
    """The room's members on every node, kept in Redis next to ``roomlog``."""

    distributed = True

    def __init__(self, roomlog: RedisLog) -> None:
        self.log = roomlog
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._count = 0
        self._next_beat = 0.0
        self._next_reap = 0.0
        self._scripts = {name: Script(src) for name, src in
                         (("claim", CLAIM), ("roster", ROSTER), ("release", RELEASE),
                          ("sync", SYNC), ("reap", REAP), ("who", WHO))}
        roomlog.scripts.extend(self._scripts.values())
        roomlog.extra_streams[self.key("inbox")] = ["0-0", self._on_inbox]
        roomlog.up_hooks.append(self._on_up)
        roomlog.tick_hooks.append(self.tick)
        roomlog.close_hooks.append(self.close)
        roomlog.flush_hooks.append(self._ask_roster)
        # Claims made this turn: [done, Claim once answered].  One ROSTER
        # after them all serves every welcome of the turn: a join storm
        # costs one member list per turn, not one per join.
        self._batch: list[list] = []
        self._first_up = True
        self._registered = False
        # Casefolded names claimed but not yet members here (count per name).
        self._claiming: dict[str, int] = {}

    def key(self, name: str) -> str:
        """This node's key ``name`` (alive, members, inbox)."""
        return self.log.key(f"node:{self.node}:{name}")

    def _run(self, name: str, keys: list[str], args: list[Any],
             callback: Callable[[Any], None] | None = None) -> None:
        self._scripts[name].run(self.log.cmd, [self.log.key(k) for k in keys], args,
                                callback or _log_error)

    def count(self) -> int:
        return max(self._count, len(self.room.members))

    # --- registration, heartbeat, reaping ------------------------------------

    def _on_up(self) -> None:
        cmd = self.log.cmd
        cmd.command("SET", self.key("alive"), "1", "PX", NODE_TTL_MS)
        cmd.command("SADD", self.log.key("nodes"), self.node)
        self._registered = True  # a heartbeat's SADD answering 1 now means reaped
        grace = 0.0 if self._first_up else REAP_GRACE
        self._first_up = False
        self._next_reap = time.monotonic() + max(grace, REAP_EVERY)
        self._sync()

    def _sync(self) -> None:
        """Make Redis hold exactly this node's members (SYNC)."""
        if self.log.resetting:
            return  # a new epoch: the members are about to be closed
        pairs: list[str] = []
        for key, client in self.room.members.items():
            pairs += [key, self._value(client.label, client.resume)]
        # Claimed (or being claimed) but not a member here yet: keep it.
        for key in self._claiming:
            pairs += [key, ""]
        self._run("sync", ["epoch", "seq", "stream", "names", "index"],
                  [self.log.epoch, self.log.retain, self.log.prefix, self.node, now_ms(),
                   self.room.limits.announce_limit, *pairs], self._reasserted)

    def _reasserted(self, missing: Any) -> None:
        if isinstance(missing, Exception):
            return _log_error(missing)
        for key in missing:
            client = self.room.members.get(key.decode())
            if client is not None and not self.room.large:
                log.info("%s was taken out while Redis was away; announcing it again",
                         client.label)
                self.room._stage({"type": "join", "member": client.label, "ts": now_ms()}, None)

    def tick(self, now: float) -> None:
        """Renew the alive key, refresh the member count, reap dead nodes."""
        if not self.log.cmd.up or now < self._next_beat:
            return
        self._next_beat = now + HEARTBEAT
        # Also the probe that tells when Redis accepts writes again.
        self.log.cmd.command("SET", self.key("alive"), "1", "PX", NODE_TTL_MS,
                             callback=self.log.note_write)
        # 1: we had been unregistered, i.e. reaped as dead (the loop or the
        # link stalled past the TTL): put our members back at once.
        self.log.cmd.command("SADD", self.log.key("nodes"), self.node,
                             callback=self._still_registered)
        self.log.cmd.command("HLEN", self.log.key("names"), callback=self._set_count)
        if now >= self._next_reap:
            self._next_reap = now + REAP_EVERY
            self._reap("hung_up", "")

    def _still_registered(self, added: Any) -> None:
        if added == 1 and self._registered:
            self._sync()

    def _reap(self, reason: str, node: str) -> None:
        self._run("reap", ["epoch", "seq", "stream", "nodes", "names", "index"],
                  self._reap_args(reason, node), self._reaped)

    def _reap_args(self, reason: str, node: str) -> list[Any]:
        return [self.log.epoch, self.log.retain, self.log.prefix, now_ms(),
                self.room.limits.announce_limit, reason, node]

    def _reaped(self, gone: Any) -> None:
        if isinstance(gone, Exception):
            return _log_error(gone)
        if gone:
            log.info("took %d members of stopped nodes out of the room", gone)

    def _set_count(self, count: Any) -> None:
        if isinstance(count, int):
            self._count = count

    def close(self) -> None:
        """Leave the room at shutdown: this node's members leave on the
        other nodes at once (reason ``hung_up``), not after the TTL."""
        keys = [self.log.key(k) for k in ("epoch", "seq", "stream", "nodes", "names", "index")]
        reap = self._scripts["reap"]
        try:
            resp.call(self.log.address, ("EVAL", reap.source, len(keys), *keys,
                                         *self._reap_args("hung_up", self.node)), timeout=2.0)
        except OSError as exc:
            log.warning("could not take this node's members out of Redis: %s", exc)

    # --- names -------------------------------------------------------------------------

    def _value(self, label: str, token: str) -> str:
        return f"{self.node}\n{token}\n{json.dumps(label, ensure_ascii=False)}"

    def claim(self, client, key, label, token, resume, done) -> None:
        self._claiming[key] = self._claiming.get(key, 0) + 1

        def finish(claim: Claim) -> None:
            left = self._claiming.pop(key) - 1
            if left:
                self._claiming[key] = left
            done(claim)

        entry: list = [finish, None]
        self._batch.append(entry)

        def reply(result: Any) -> None:
            entry[1] = self._claim_of(key, result)

        self._run("claim", ["names", "index"],
                  [self.log.prefix, self.node, key, self._value(label, token), resume or ""],
                  reply)

    def _ask_roster(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []

        def reply(result: Any) -> None:
            arrays, count = None, None
            if not isinstance(result, Exception):
                count = self._count = result[0]
                if len(result) > 1 or count == 0:
                    pairs = sorted(zip(result[1::2], result[2::2]))
                    # Encoded once for the whole batch of welcomes.
                    arrays = encode_arrays([_label(value) for _, value in pairs],
                                           self.room.limits.max_frame)
            for entry in batch:
                done, claim = entry
                if claim is None:
                    # Its reply is still to come (it was re-sent as EVAL
                    # after NOSCRIPT): the next turn's roster serves it.
                    self._batch.append(entry)
                    continue
                if claim.error is None:
                    claim = Claim(count=count or claim.count, arrays=arrays,
                                  replaced=claim.replaced, partial=count is None)
                done(claim)

        self._run("roster", ["names"], [self.room.limits.announce_limit], reply)

    def _claim_of(self, key: str, result: Any) -> Claim:
        if isinstance(result, Exception):
            log.warning("claim of %r failed: %s", key, result)
            return Claim(error="room_unavailable")
        if result[0] == 0:
            return Claim(error="name_taken")
        self._count = result[1]
        node, old_token, old_label = (x.decode() for x in result[2:5])
        replaced = None
        if node and node != self.node:
            replaced = json.loads(old_label)
            # The stale connection is on another node: tell it to let go.
            self.log.cmd.command("XADD", self.log.key(f"node:{node}:inbox"), "MAXLEN",
                                 "~", INBOX_RETAIN, "*", "t", key, "drop", old_token)
        return Claim(count=result[1], replaced=replaced)

    def release(self, client) -> None:
        self._count = max(0, self._count - 1)
        self._run("release", ["names", "index"],
                  [self.log.prefix, self.node, client.name.casefold(), client.resume],
                  self._set_count)

    # --- who and private ----------------------------------------------------------------

    def who(self, client, message: dict) -> None:
        """Answer ``who`` from Redis (every node's members)."""
        room = self.room
        limit, prefix, cursor = message.get("limit"), message.get("prefix"), message.get("cursor")
        full = limit is None and prefix is None and cursor is None and not room.large
        if not full:
            limit = WHO_PAGE if limit is None else limit
            if not 1 <= limit <= WHO_PAGE_MAX:
                raise protocol.MessageError("bad_message", f"who: limit is 1 to {WHO_PAGE_MAX}")
        prefix = (prefix or "").casefold().encode()
        low = b"[" + prefix if prefix else b"-"
        if cursor is not None and cursor.encode() >= prefix:
            low = b"(" + cursor.encode()
        high = b"[" + prefix + b"\xff" if prefix else b"+"
        count = room.limits.announce_limit + 1 if full else limit + 1

        def reply(result: Any) -> None:
            client.waiting = False
            if client.closed:
                return
            if isinstance(result, Exception):
                return self._unavailable(client)
            self._count = result[0]
            keys = [k.decode() for k in result[1::2]]
            labels = [_label(v) for v in result[2::2] if v]
            if full:
                return room.send_members(client, labels)
            page = chunk_labels(labels[:limit], room.limits.max_frame)[0]
            more = len(labels) > len(page)
            answer = {"type": "members", "members": page, "more": more, "count": result[0]}
            if more and page:
                answer["cursor"] = keys[len(page) - 1]
            room.out.send(client, room._encode(answer), reply=True)

        client.waiting = True
        self._run("who", ["names", "index"], [low, high, count], reply)

    def private(self, client, message: dict) -> None:
        """Send a private message to a member on another node."""
        room, to = self.room, message["to"]
        name = to.split("@", 1)[0]

        def found(value: Any) -> None:
            client.waiting = False
            if client.closed:
                return
            if isinstance(value, Exception):
                return self._unavailable(client)
            label = _label(value) if value else None
            node = value.split(b"\n", 1)[0].decode() if value else None
            if label is None or node == self.node or (to != name and to != label):
                return room.out.send(client, room._encode(
                    {"type": "error", "code": "no_such_member",
                     "message": f"no one called {to!r}"}), reply=True)
            frame = room._encode({"type": "private", "from": client.label, "to": label,
                                  "text": message["text"], "ts": now_ms()})
            self.log.cmd.command("XADD", self.log.key(f"node:{node}:inbox"), "MAXLEN", "~",
                                 INBOX_RETAIN, "*", "t", name.casefold(), "f", frame,
                                 callback=_log_error)
            room.out.send(client, frame, reply=True)

        client.waiting = True
        self.log.cmd.command("HGET", self.log.key("names"), name.casefold(), callback=found)

    def _on_inbox(self, fields: list[bytes]) -> None:
        entry = dict(zip(fields[::2], fields[1::2]))
        client = self.room.members.get(entry.get(b"t", b"").decode())
        if client is None:
            return
        if b"f" in entry:
            self.room.out.send(client, entry[b"f"])
        elif b"drop" in entry and client.resume == entry[b"drop"].decode():
            self.room.replaced_elsewhere(client)

    def _unavailable(self, client) -> None:
        self.room.out.send(client, self.room._encode(
            {"type": "error", "code": "room_unavailable",
             "message": "the room cannot answer that right now; try again later"}), reply=True)


def _log_error(reply: Any) -> None:
    if isinstance(reply, Exception) and not isinstance(reply, ConnectionError):
        log.error("redis: %s", reply)
