/* The member panel of a large room (protocol v2: welcome.large, `who` with
 * limit, cursor and prefix).  The server hands out the member list a page at
 * a time, in casefolded name order; this keeps the pages it has loaded and
 * puts in the DOM only the rows that are in view (plus a few either side),
 * so a room of 10,000 members costs a screenful of nodes.  Chat text never
 * becomes HTML here either: labels go in through textContent. */
(function () {
  "use strict";

  // Every row is this tall (px), so a row's place is index * ROW_PX and
  // the scroll height is known before the rows exist.  chat.css agrees.
  var ROW_PX = 36;
  // Rows drawn beyond each edge of the view, so a fast scroll shows no gap.
  var OVERSCAN = 6;
  // A page of `who` (the server allows 1-500).
  var PAGE = 100;
  // Ask for the next page when this few loaded rows remain below the view.
  var PREFETCH_ROWS = 30;

  /**
   * new MemberPager({scroller, request, render, empty})
   *   scroller: an element with overflow-y: auto; the pager fills it.
   *   request(query): send {type: "who", ...query}; the reply must come
   *     back through onPage(reply, query.generation).
   *   render(label) -> Element: the body of one row.
   *   empty(prefix) -> string: what an empty list says.
   */
  function MemberPager(opts) {
    this.opts = opts;
    this.scroller = opts.scroller;
    this.spacer = document.createElement("div");
    this.spacer.className = "pager-spacer";
    this.rows = document.createElement("ul");
    this.rows.className = "pager-rows";
    this.spacer.appendChild(this.rows);
    this.scroller.appendChild(this.spacer);
    this.items = [];
    this.more = false;
    this.cursor = null;
    this.prefix = "";
    this.pending = false;
    this.generation = 0;
    this.drawn = "";
    var self = this;
    this.scroller.addEventListener("scroll", function () { self.draw(); }, { passive: true });
    if (window.ResizeObserver) {
      new ResizeObserver(function () { self.draw(true); }).observe(this.scroller);
    }
  }

  MemberPager.ROW_PX = ROW_PX;
  MemberPager.PAGE = PAGE;

  // Start again from the first page, with a new search prefix.  A reply
  // still due for the old list is recognised by its generation and dropped.
  MemberPager.prototype.reset = function (prefix) {
    this.generation += 1;
    this.items = [];
    this.more = true;
    this.cursor = null;
    this.prefix = prefix || "";
    this.pending = false;
    this.scroller.scrollTop = 0;
    this.draw(true);
    this.fetch();
  };

  MemberPager.prototype.fetch = function () {
    if (this.pending || !this.more) {
      return;
    }
    this.pending = true;
    var query = { limit: PAGE, generation: this.generation };
    if (this.cursor !== null) {
      query.cursor = this.cursor;
    }
    if (this.prefix) {
      query.prefix = this.prefix;
    }
    if (!this.opts.request(query)) {
      this.pending = false;  // not connected: the next welcome resets us
    }
  };

  // A `members` reply to one of our requests.
  MemberPager.prototype.onPage = function (reply, generation) {
    if (generation !== this.generation) {
      return;
    }
    this.pending = false;
    var labels = Array.isArray(reply.members) ? reply.members : [];
    for (var i = 0; i < labels.length; i++) {
      this.items.push(String(labels[i]));
    }
    this.more = reply.more === true && typeof reply.cursor === "string" && labels.length > 0;
    this.cursor = this.more ? reply.cursor : null;
    this.draw(true);
  };

  // Loaded labels (for tests and the "To" menu's lookups).
  MemberPager.prototype.loaded = function () {
    return this.items.slice();
  };

  MemberPager.prototype.draw = function (force) {
    var rowsTotal = this.items.length + (this.more ? 1 : 0);
    var emptyRow = rowsTotal === 0;
    this.spacer.style.height = Math.max(rowsTotal, emptyRow ? 1 : 0) * ROW_PX + "px";
    var top = this.scroller.scrollTop;
    var height = this.scroller.clientHeight;
    var first = Math.max(0, Math.floor(top / ROW_PX) - OVERSCAN);
    var last = Math.min(rowsTotal, Math.ceil((top + height) / ROW_PX) + OVERSCAN);
    if (this.more && last >= this.items.length - PREFETCH_ROWS) {
      this.fetch();
    }
    // Rows below the view (loaded or not) fade the bottom edge: a short
    // panel never hides members with no sign that more exist.
    this.scroller.dataset.end = top + height >= rowsTotal * ROW_PX - 1 ? "true" : "false";
    var key = first + ":" + last + ":" + this.items.length + ":" + this.more + ":" + this.generation;
    if (!force && key === this.drawn) {
      return;
    }
    this.drawn = key;
    // Keep keyboard focus on the same member across the redraw.
    var active = document.activeElement;
    var focused = active && this.rows.contains(active) ? active.dataset.label : null;
    this.rows.textContent = "";
    this.rows.style.transform = "translateY(" + first * ROW_PX + "px)";
    if (emptyRow) {
      var none = document.createElement("li");
      none.className = "pager-row pager-empty";
      none.textContent = this.opts.empty(this.prefix);
      this.rows.appendChild(none);
      return;
    }
    var refocus = null;
    for (var i = first; i < last; i++) {
      var row = document.createElement("li");
      row.className = "pager-row";
      if (i < this.items.length) {
        var body = this.opts.render(this.items[i]);
        row.appendChild(body);
        row.dataset.label = this.items[i];
        if (focused !== null && focused === this.items[i]) {
          refocus = body;
        }
      } else {
        row.className += " pager-loading";
        row.textContent = "Loading\u2026";
      }
      this.rows.appendChild(row);
    }
    if (refocus && refocus.focus) {
      refocus.focus();
    }
  };

  window.MemberPager = MemberPager;
}());
