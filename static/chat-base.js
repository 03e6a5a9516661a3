/* The chat room page's shared part: limits, texts, the elements, the state
 * every part reads, and small helpers.  It makes window.Chat, the namespace
 * the other parts (chat-transcript.js, chat-gaps.js, chat-members.js,
 * chat-connection.js, chat.js, loaded in that order) share.  No HTML is ever built from chat
 * text: everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat = {};

  var ERROR_TEXT = {
    name_taken: "That name is taken. Try another.",
    name_invalid: "Use 1\u201332 letters, digits, -, _ or . (not \u201cserver\u201d).",
    no_such_member: "No one by that name is here.",
    nothing_visible: "Nothing visible to send: add some text.",
    rate_limited: "You are sending too fast; that message was dropped.",
    flooding: "Disconnected for sending too fast.",
    bad_message: "The server could not accept that message.",
    server_full: "The room is full. Try again later.",
    too_many_connections: "Too many connections from your address.",
    hello_timeout: "The server gave up waiting for your name.",
    shutting_down: "The server is shutting down."
  };

  var STATUS_TEXT = {
    connecting: "Connecting\u2026",
    connected: "Connected",
    reconnecting: "Reconnecting\u2026",
    offline: "Offline"
  };

  var $ = function (id) { return document.getElementById(id); };
  var el = {
    app: $("app"),
    status: $("status"),
    statusText: $("status-text"),
    joinView: $("join-view"),
    joinForm: $("join-form"),
    joinName: $("join-name"),
    joinButton: $("join-button"),
    joinError: $("join-error"),
    chatView: $("chat-view"),
    transcript: $("transcript"),
    compose: $("compose"),
    composeTo: $("compose-to"),
    composeText: $("compose-text"),
    composeError: $("compose-error"),
    leaveButton: $("leave-button"),
    members: $("members"),
    membersStale: $("members-stale"),
    memberList: $("member-list"),
    memberMore: $("member-more"),
    memberFinder: $("member-finder"),
    memberSearch: $("member-search"),
    memberPager: $("member-pager"),
    memberCount: $("member-count")
  };

  var state = {
    ws: null,
    name: null,          // the name asked for
    label: null,         // our name@address once welcomed
    wanted: false,       // the user wants to be in the room
    joined: false,       // welcomed on the current socket
    everJoined: false,   // welcomed at least once since the user pressed Join
    joinPending: false,  // Join pressed, no welcome or refusal yet
    lastSeq: 0,          // highest room event seq rendered
    epoch: null,         // the chat server run that lastSeq belongs to
    memberBase: 0,       // welcome's last_seq: the member list is as of this seq
    members: new Map(),  // label -> true, in arrival order
    memberChunks: null,  // labels being collected while "more" is true
    catchup: null,       // {after, remaining, timer} while a history reply is due
    pending: new Map(),  // seq -> event held back until the gap before it fills
    pinned: true,        // the transcript is scrolled to its end: keep it there
    lostCode: null,      // close code of the socket whose loss began this reconnect
    replaying: false,    // between a welcome and the end of its replay
    replayUntil: 0,      // the welcome's last_seq: its replay ends there
    oldestSeq: null,     // lowest seq shown from the current transcript (epoch)
    olderDone: false,    // the beginning of the room is shown
    olderWanted: false,  // scrolling back was asked while the request slot was busy
    older: null,         // {before, remaining, more, events, done, timer} while a
                         // history-before reply is due (chat-gaps.js)
    large: false,        // over the server's announce limit: paged member panel
    largeCount: 0,       // the room's member count, from welcome/presence/members
    whoQueue: [],        // the members replies due, in order: {kind: "full"|"page"}
    recents: [],         // labels picked or heard from privately, newest first
    searchTimer: 0,
    attempt: 0,
    reconnectTimer: 0,
    helloTimer: 0,
    nameTakenSince: 0,
    lastRecv: 0,
    pingSentAt: 0,
    pingCount: 0
  };

  // --- small helpers ----------------------------------------------------

  function nameOf(label) {
    var at = String(label).indexOf("@");
    return at < 0 ? String(label) : String(label).slice(0, at);
  }

  function addressOf(label) {
    var at = String(label).indexOf("@");
    return at < 0 ? "" : String(label).slice(at + 1);
  }

  function span(className, text) {
    var node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  function timeNode(ts) {
    var node = document.createElement("time");
    var date = new Date(typeof ts === "number" ? ts : Date.now());
    node.className = "time";
    node.dateTime = date.toISOString();
    node.title = date.toLocaleString();
    node.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return node;
  }

  function send(message) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      return false;
    }
    state.ws.send(JSON.stringify(message));
    return true;
  }

  function setStatus(kind, detail) {
    el.status.dataset.state = kind;
    el.statusText.textContent = detail ? STATUS_TEXT[kind] + " " + detail : STATUS_TEXT[kind];
  }

  function showChat(on) {
    el.joinView.hidden = on;
    el.chatView.hidden = !on;
    el.app.dataset.joined = on ? "true" : "false";
  }

  function setJoinError(text) {
    el.joinError.textContent = text || "";
    el.joinName.setAttribute("aria-invalid", text ? "true" : "false");
  }

  function setComposeError(text) {
    el.composeError.textContent = text || "";
  }

  function setJoinBusy(busy) {
    el.joinButton.disabled = busy;
    el.joinButton.textContent = busy ? "Joining\u2026" : "Join";
  }

  C.ERROR_TEXT = ERROR_TEXT;
  C.el = el;
  C.state = state;
  C.nameOf = nameOf;
  C.addressOf = addressOf;
  C.span = span;
  C.timeNode = timeNode;
  C.send = send;
  C.setStatus = setStatus;
  C.showChat = showChat;
  C.setJoinError = setJoinError;
  C.setComposeError = setComposeError;
  C.setJoinBusy = setJoinBusy;
}());
