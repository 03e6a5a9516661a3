/* The connection: one WebSocket to the gateway, which relays the chat
 * protocol (tcpserver/PROTOCOL.md) as JSON text; hello, resume, reconnects
 * and what the server says.
 * Part of the chat room page; the parts share one namespace, window.Chat
 * (chat-base.js makes it).  No HTML is ever built from chat text:
 * everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat;
  var el = C.el;
  var state = C.state;

  // Limits and texts of this part.
  // Reconnect delays double from the base up to the cap; each is drawn from
  // the upper half of its window ("equal jitter") so a room full of pages
  // that lost the same gateway does not return in one burst.
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 15000;
  // After a reconnect the server may not have noticed the old session gone
  // yet (a dead link is only found by its idle timeout, 60 s by default).
  var NAME_TAKEN_RETRY_MS = 2000;
  var NAME_TAKEN_GIVE_UP_MS = 90000;
  // Silence this long draws our own ping; no answer this soon after it and
  // the link is taken for dead.
  var HEARTBEAT_IDLE_MS = 25000;
  var HEARTBEAT_WAIT_MS = 10000;
  // WebSocket close codes from the gateway (RFC 6455 section 7.4.1, README):
  // 1012 the chat server shut down in order after a `shutdown` notice and
  // will be back; 1011 the chat server was lost without a word (a crash) or
  // cannot be reached.  Both are worth reconnecting for; the user is told
  // which one happened.
  var CLOSE_RESTART = 1012;
  var CLOSE_LOST_SERVER = 1011;
  // The welcome's resume token, kept per tab (sessionStorage), so that a
  // reconnect takes our name back from our own stale connection at once
  // instead of waiting for the server to time it out (protocol v2).
  var RESUME_KEY = "chatroom.resume";

  // --- the connection -----------------------------------------------------

  function wsUrl() {
    var url = new URL("ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    return url.href;
  }

  function connect() {
    window.clearTimeout(state.reconnectTimer);
    window.clearTimeout(state.helloTimer);
    C.setStatus(state.everJoined ? "reconnecting" : "connecting",
              state.everJoined ? reconnectDetail() : "");
    var ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      onSocketGone(null, "cannot open a WebSocket");
      return;
    }
    state.ws = ws;
    state.joined = false;
    ws.onopen = function () {
      if (state.ws === ws) {
        state.lastRecv = Date.now();
        sendHello();
      }
    };
    ws.onmessage = function (event) {
      if (state.ws !== ws) {
        return;
      }
      state.lastRecv = Date.now();
      state.pingSentAt = 0;
      // The gateway may batch several server payloads into one message,
      // separated by "\n" (JSON payloads never hold a raw newline).
      var parts = String(event.data).split("\n");
      for (var i = 0; i < parts.length; i++) {
        // A handler may close or replace this socket mid-batch.
        if (state.ws !== ws) {
          return;
        }
        var msg;
        try {
          msg = JSON.parse(parts[i]);
        } catch (err) {
          continue;
        }
        if (msg && typeof msg === "object" && typeof msg.type === "string") {
          handle(msg);
        }
      }
    };
    ws.onclose = function (event) {
      if (state.ws === ws) {
        onSocketGone(event.code, event.reason);
      }
    };
  }

  function storedResume(name) {
    try {
      var kept = JSON.parse(window.sessionStorage.getItem(RESUME_KEY) || "null");
      if (kept && typeof kept.token === "string" && typeof kept.name === "string" &&
          kept.name.toLowerCase() === String(name).toLowerCase()) {
        return kept.token;
      }
    } catch (err) {
      // Storage off or garbled: join without a token, as a new member.
    }
    return null;
  }

  function keepResume(name, token) {
    try {
      if (typeof token === "string" && token) {
        window.sessionStorage.setItem(RESUME_KEY, JSON.stringify({ name: name, token: token }));
      } else {
        window.sessionStorage.removeItem(RESUME_KEY);
      }
    } catch (err) {
      // Storage off: reconnects then wait for the old session to time out.
    }
  }

  function sendHello() {
    window.clearTimeout(state.helloTimer);
    var hello = { type: "hello", name: state.name };
    var token = storedResume(state.name);
    if (token) {
      hello.resume = token;
    }
    C.send(hello);
  }

  // The socket is closed or given up on; decide what happens next.
  function onSocketGone(code, reason) {
    var ws = state.ws;
    state.ws = null;
    state.joined = false;
    window.clearTimeout(state.helloTimer);
    if (state.catchup) {
      window.clearTimeout(state.catchup.timer);
      state.catchup = null;
    }
    C.abortFetch();  // a page of scroll-back is asked again; a gap resumes once back
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
        ws.close(4000, "abandoned");
      }
    }
    if (!state.wanted) {
      C.setStatus("offline");
      return;
    }
    if (!state.everJoined) {
      // Never got in: if a Join is waiting, say why next to the form.  A
      // socket left open after a name error just ends (the server's hello
      // timeout); the next Join opens another.
      state.wanted = false;
      C.setStatus("offline");
      C.setJoinBusy(false);
      if (state.joinPending) {
        state.joinPending = false;
        C.setJoinError(closeText(code, reason));
      }
      C.showChat(false);
      return;
    }
    C.setMembersStale(true);
    if (state.attempt === 0) {
      // Later attempts fail with 1011 while a restarting server is down;
      // the status keeps saying why the page first lost it.
      state.lostCode = code;
      lostNotice(code, reason);
    }
    scheduleReconnect();
  }

  // Said once when a joined page loses its socket: an orderly restart, a
  // lost chat server and a dropped link read differently.
  function lostNotice(code, reason) {
    var text;
    var kind;
    if (code === CLOSE_RESTART) {
      text = "The chat server shut down (restarting or stopping). You will be reconnected when it is back\u2026";
      kind = "restart";
    } else if (code === CLOSE_LOST_SERVER) {
      text = "Lost the chat server: it stopped without notice. Reconnecting\u2026";
      kind = "lost";
    } else {
      text = "Connection lost" + (reason ? ": " + reason : "") + ". Reconnecting\u2026";
      kind = "dropped";
    }
    C.notice(text, "warning connection-" + kind);
  }

  function closeText(code, reason) {
    if (C.ERROR_TEXT[reason]) {
      return C.ERROR_TEXT[reason];
    }
    if (code === CLOSE_RESTART) {
      return "The chat server is restarting or stopping. Try again in a moment.";
    }
    if (code === CLOSE_LOST_SERVER) {
      return "The chat server is unreachable. Try again later.";
    }
    if (reason) {
      return "Could not join: " + reason;
    }
    return "Could not reach the chat server. Try again later.";
  }

  function reconnectDetail() {
    return state.lostCode === CLOSE_RESTART ? "\u2014 the server is restarting or stopping"
      : state.lostCode === CLOSE_LOST_SERVER ? "\u2014 the chat server is unreachable" : "";
  }

  function scheduleReconnect() {
    window.clearTimeout(state.reconnectTimer);
    if (navigator.onLine === false) {
      C.setStatus("offline", "\u2014 waiting for the network");
      return;  // the "online" event reconnects
    }
    var window_ = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, state.attempt));
    var delay = window_ / 2 + Math.random() * window_ / 2;
    state.attempt += 1;
    C.setStatus("reconnecting", reconnectDetail());
    state.reconnectTimer = window.setTimeout(connect, delay);
  }

  function handle(msg) {
    switch (msg.type) {
      case "welcome": onWelcome(msg); break;
      case "members": C.onMembers(msg); break;
      case "presence": C.onPresence(msg); break;
      case "message":
      case "join":
      case "leave": C.roomEvent(msg); break;
      case "history": C.onHistoryHeader(msg); break;
      case "private": C.renderPrivate(msg); break;
      case "error": onError(msg); break;
      case "ping":
        C.send(msg.token === undefined ? { type: "pong" } : { type: "pong", token: msg.token });
        break;
      case "shutdown":
        C.notice(msg.message || "The server is shutting down.", "warning");
        break;
      default:
        break;  // pong, and anything newer than this page
    }
  }

  function onWelcome(msg) {
    var resuming = state.everJoined;
    state.joinPending = false;
    state.joined = true;
    state.everJoined = true;
    state.attempt = 0;
    state.nameTakenSince = 0;
    state.label = msg.label;
    state.name = msg.name;
    keepResume(msg.name, msg.resume);
    C.setStatus("connected", "as " + msg.name);
    C.setJoinBusy(false);
    C.setJoinError("");
    C.setComposeError("");
    C.showChat(true);
    // A new epoch, or numbers that never reached ours (a log lost behind
    // the same epoch): either way our seqs mean nothing to this room now.
    var restarted = state.epoch !== null &&
      (msg.epoch !== state.epoch || msg.last_seq < state.lastSeq);
    state.epoch = msg.epoch;
    if (resuming && restarted) {
      C.newTranscript("The chat server restarted; a new transcript starts here.");
    }
    // The replay ends at last_seq (our own join follows it, except in a
    // large room, where joins are not broadcast).
    state.replaying = msg.history > 0;
    state.replayUntil = msg.last_seq;
    state.memberBase = msg.last_seq;
    state.memberChunks = null;
    state.whoQueue = [];
    state.largeCount = typeof msg.count === "number" ? msg.count : 0;
    if (msg.large === true) {
      C.showLarge(true);
      C.setMembersStale(false);
    } else {
      if (state.large) {
        C.showLarge(false);
      }
      if (msg.more) {
        state.whoQueue.push({ kind: "full" });  // the rest of the list follows
      }
      C.collectMembers(msg.members, msg.more);
    }
    if (msg.history > 0) {
      el.transcript.setAttribute("aria-busy", "true");
    }
    if (resuming) {
      C.notice("Reconnected.", "ok");
      if (state.lastSeq > 0) {
        C.startCatchup(state.lastSeq);
      }
    } else {
      el.composeText.focus();
    }
  }

  // Our numbers are from another run of the room (PROTOCOL.md unknown_seq):
  // a new transcript, continuing from the welcome; what came before it can
  // be loaded by scrolling back.
  function onUnknownSeq() {
    if (state.catchup) {
      window.clearTimeout(state.catchup.timer);
      state.catchup = null;
    }
    var held = Array.from(state.pending.values());
    C.newTranscript("The chat server's transcript changed; a new transcript starts here.");
    state.lastSeq = state.memberBase;
    held.forEach(function (ev) {
      if (ev.seq > state.lastSeq) {
        state.pending.set(ev.seq, ev);
      }
    });
    C.drainPending(true);
    C.loadOlder();
  }

  function onError(msg) {
    var code = msg.code;
    if (code === "unknown_seq") {
      onUnknownSeq();
      return;
    }
    var text = code === "name_taken"
      ? "The name \u201c" + state.name + "\u201d is taken. Try another."
      : C.ERROR_TEXT[code] || msg.message || code;
    if (!state.joined && code === "room_unavailable" && state.everJoined) {
      // A room kept in Redis cannot check names while Redis is away: the
      // hello of a rejoin is asked again until it can.
      C.setStatus("reconnecting", "\u2014 the room is unavailable");
      state.helloTimer = window.setTimeout(sendHello, NAME_TAKEN_RETRY_MS);
      return;
    }
    if (!state.joined && (code === "name_taken" || code === "name_invalid" ||
                          code === "room_unavailable")) {
      if (!state.everJoined) {
        // The socket stays open: the next Join sends another hello on it.
        state.joinPending = false;
        C.setStatus("offline");
        C.setJoinBusy(false);
        C.setJoinError(text);
        el.joinName.focus();
        return;
      }
      if (code === "name_taken") {
        // Probably our own old session, not yet noticed gone.
        var now = Date.now();
        state.nameTakenSince = state.nameTakenSince || now;
        if (now - state.nameTakenSince < NAME_TAKEN_GIVE_UP_MS) {
          C.setStatus("reconnecting", "\u2014 waiting for the old session to end");
          state.helloTimer = window.setTimeout(sendHello, NAME_TAKEN_RETRY_MS);
          return;
        }
      }
      giveUp(text);
      return;
    }
    if (!state.everJoined) {
      if (state.joinPending) {
        C.setJoinError(text);
      }
      return;
    }
    if (code === "room_unavailable" && state.older && state.older.remaining === -1) {
      // The answer to our history request (Redis away): no reply will come,
      // so the marker offers the button again at once.
      C.endFetch("unavailable");
    }
    C.setComposeError(text);
  }

  // Stop reconnecting and hand the choice back to the user.
  function giveUp(text) {
    state.wanted = false;
    state.everJoined = false;
    var ws = state.ws;
    if (ws) {
      state.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close(1000, "left");
    }
    C.setStatus("offline");
    C.setJoinBusy(false);
    C.setJoinError(text);
    C.showChat(false);
    el.joinName.focus();
  }

  function heartbeat() {
    if (!state.ws || !state.joined) {
      return;
    }
    var now = Date.now();
    if (state.pingSentAt && now - state.pingSentAt > HEARTBEAT_WAIT_MS) {
      onSocketGone(null, "no answer from the gateway");
    } else if (!state.pingSentAt && now - state.lastRecv > HEARTBEAT_IDLE_MS) {
      state.pingCount += 1;
      state.pingSentAt = now;
      C.send({ type: "ping", token: "page-" + state.pingCount });
    }
  }

  C.connect = connect;
  C.keepResume = keepResume;
  C.sendHello = sendHello;
  C.heartbeat = heartbeat;
}());
