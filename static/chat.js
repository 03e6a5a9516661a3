/* The chat room page: what the user does (join, send, leave) and the wiring
 * of events.  Loaded last of the page's parts, which share one namespace,
 * window.Chat (chat-base.js makes it).  No HTML is ever built from chat
 * text: everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat;
  var el = C.el;
  var state = C.state;

  // Limits and texts of this part.
  // Within this many pixels of the top, scrolling loads the older page.
  var OLDER_SCROLL_PX = 40;
  var NAME_RE = /^[A-Za-z0-9._-]{1,32}$/;
  // The server's rule for message text (check_text in tcpserver/protocol.py):
  // refused when every character is White_Space, a format character (Cf), a
  // Default_Ignorable_Code_Point, or a filler that draws as blank (Braille
  // blank, the Hangul fillers).  By Unicode property, not a list of known
  // offenders, so U+200B, U+2060, U+FEFF, U+00AD and the like all count.
  var NOTHING_VISIBLE_RE =
    /^[\p{White_Space}\p{Cf}\p{Default_Ignorable_Code_Point}\u2800\u3164\uFFA0\u115F\u1160]*$/u;

  // --- user actions -------------------------------------------------------

  function resetRoom() {
    state.lastSeq = 0;
    state.epoch = null;
    state.memberBase = 0;
    state.pending.clear();
    state.catchup = null;
    state.label = null;
    el.transcript.textContent = "";
    state.pinned = true;
    state.oldestSeq = null;
    state.olderDone = false;
    state.replaying = false;
    C.dropOlder();
    C.setMarker("idle");
    state.recents = [];
    state.whoQueue = [];
    state.largeCount = 0;
    if (state.large) {
      C.showLarge(false);
    }
    C.setMembers([]);
    C.setMembersStale(false);
  }

  function onJoinSubmit(event) {
    event.preventDefault();
    var name = el.joinName.value.trim();
    if (!NAME_RE.test(name) || name.toLowerCase() === "server") {
      C.setJoinError(C.ERROR_TEXT.name_invalid);
      el.joinName.focus();
      return;
    }
    C.setJoinError("");
    C.setJoinBusy(true);
    C.setStatus("connecting");
    state.joinPending = true;
    state.name = name;
    state.wanted = true;
    state.attempt = 0;
    resetRoom();
    if (state.ws && state.ws.readyState === WebSocket.OPEN && !state.joined) {
      C.sendHello();  // the socket stays open after a name error
    } else if (!state.ws) {
      C.connect();
    }
  }

  function hasVisible(text) {
    return !NOTHING_VISIBLE_RE.test(text);
  }

  function onComposeSubmit(event) {
    event.preventDefault();
    var text = el.composeText.value;
    if (text === "") {
      return;  // Enter on an empty box is not worth a scolding
    }
    var message = parseCommand(text);
    if (message === null) {
      return;
    }
    if (typeof message.text === "string" && !hasVisible(message.text)) {
      // The box keeps the text, so the user sees what was refused.
      C.setComposeError(C.ERROR_TEXT.nothing_visible);
      el.composeText.focus();
      return;
    }
    if (message.type === "quit") {
      leave();
      return;
    }
    if (message.type === "who") {
      if (!state.joined) {
        C.setComposeError("Not connected.");
        return;
      }
      if (state.large) {
        C.pager.reset(el.memberSearch.value.trim());
      } else {
        C.askWholeList();
      }
      C.setComposeError("");
      el.composeText.value = "";
      return;
    }
    if (!state.joined || !C.send(message)) {
      C.setComposeError("Not connected: your message was not sent.");
      return;
    }
    C.setComposeError("");
    el.composeText.value = "";
  }

  // Slash commands; anything else goes to the chosen recipient.
  function parseCommand(text) {
    // Only the start is trimmed: "/msg bob \ufeff" must reach the
    // nothing-visible rule, not lose its body to trim().
    var match = /^\/(\w+)(?:\s+([\s\S]*))?$/.exec(text.replace(/^\s+/, ""));
    if (match) {
      var command = match[1].toLowerCase();
      var rest = match[2] || "";
      if (command === "msg" || command === "w") {
        var parts = /^(\S+)\s+([\s\S]+)$/.exec(rest);
        if (!parts) {
          C.setComposeError("Usage: /msg name text");
          return null;
        }
        return { type: "private", to: parts[1], text: parts[2] };
      }
      if (command === "who") {
        return { type: "who" };
      }
      if (command === "quit") {
        return { type: "quit" };
      }
    }
    var to = el.composeTo.value;
    return to ? { type: "private", to: to, text: text } : { type: "say", text: text };
  }

  function leave() {
    C.keepResume(null, null);  // we quit: there is no session to take back
    state.wanted = false;
    state.everJoined = false;
    window.clearTimeout(state.reconnectTimer);
    window.clearTimeout(state.helloTimer);
    var ws = state.ws;
    if (ws && ws.readyState === WebSocket.OPEN && state.joined) {
      ws.send(JSON.stringify({ type: "quit" }));
      // The server closes after quit; don't wait on it forever.
      window.setTimeout(function () {
        if (ws.readyState === WebSocket.OPEN) { ws.close(1000, "left"); }
      }, 2000);
    } else if (ws) {
      ws.close(1000, "left");
    }
    state.ws = null;
    state.joined = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
    }
    C.setStatus("offline");
    C.setJoinBusy(false);
    C.showChat(false);
    el.joinName.value = state.name || "";
    el.joinName.focus();
  }

  el.joinForm.addEventListener("submit", onJoinSubmit);
  el.compose.addEventListener("submit", onComposeSubmit);
  el.composeTo.addEventListener("change", C.updatePlaceholder);
  el.leaveButton.addEventListener("click", leave);
  el.memberMore.addEventListener("click", C.onMemberMore);
  el.memberSearch.addEventListener("input", C.onSearchInput);
  el.memberSearch.addEventListener("keydown", C.onSearchKey);
  el.memberList.addEventListener("scroll", C.updateMemberMore, { passive: true });
  el.transcript.addEventListener("scroll", function () {
    state.pinned = C.nearBottom();
    if (el.transcript.scrollTop < OLDER_SCROLL_PX &&
        el.transcript.scrollHeight > el.transcript.clientHeight) {
      C.loadOlder();
    }
  }, { passive: true });
  if (window.ResizeObserver) {
    // A resize or rotation changes the transcript's height without a
    // scroll: a reader who was at the end stays at the end.
    new ResizeObserver(function () {
      if (state.pinned) {
        C.scrollToEnd();
      }
    }).observe(el.transcript);
    new ResizeObserver(C.updateMemberMore).observe(el.memberList);
  }
  el.composeText.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && el.composeTo.value) {
      el.composeTo.value = "";
      C.updatePlaceholder();
    }
  });
  window.addEventListener("online", function () {
    if (state.wanted && !state.ws) {
      state.attempt = 0;
      C.connect();
    }
  });
  window.addEventListener("offline", function () {
    if (state.wanted && !state.ws) {
      C.setStatus("offline", "\u2014 waiting for the network");
    }
  });
  // Closing the tab is leaving: the room then reads "left", not "connection lost".
  window.addEventListener("pagehide", function () {
    if (state.joined) {
      C.send({ type: "quit" });
    }
  });
  window.setInterval(C.heartbeat, 5000);
  C.setStatus("offline");
  el.joinName.focus();
}());
