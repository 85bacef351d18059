// Agora wire protocol v1 client: a dependency-free ES module for browsers (and any runtime
// with a WHATWG WebSocket, Node.js included). Served by every gateway at /static/agora.js;
// package.json beside it makes this directory an npm package (types in agora.d.ts).
//
//   import { AgoraClient } from "/static/agora.js";
//   const client = new AgoraClient({ url: "wss://chat.example/v1/ws", token });
//   // or { ..., encoding: "msgpack" }: binary frames (chat.v1.msgpack, ./msgpack.js)
//   client.on("msg", (m) => render(m));
//   client.connect();
//   await client.subscribe(convId);
//   await client.send(convId, "hello");      // resolves with the ack
//   await client.edit(convId, msgId, "hi");  // edit, deleteMessage, react: events with a seq
//
// What it does for you (docs/protocol.md):
// - The token travels as ?token= (browsers cannot set headers on a WebSocket).
// - Reconnects with full-jitter exponential backoff. A `reconnect` frame from a draining
//   node is honoured: the client moves after `after_ms`, not before. Close 1013 (overload),
//   1011, 1001, 4008 and 4009 reconnect with backoff. A handshake that never opens (a 503
//   refusal looks like that to a browser, which hides the HTTP status) waits at least one
//   second, the smallest Retry-After the server sends; runtimes that expose the status and
//   Retry-After on the close event get them honoured exactly.
// - Close 4001 stops reconnecting until setToken() gives a new token, or, with a
//   `tokenProvider`, until the provider gives one. With a provider the client also sends
//   `auth {token}` before the session's token expires (hello.exp), so the server never
//   closes it for expiry. 1000, 1009 and 4002 stop too: the server says the client, not
//   the network, must change.
// - `unsubbed` (removed from the conversation, left it, or it closed) forgets that
//   subscription: it is not resumed on reconnect.
// - Every subscription is resumed on reconnect with `since` = the last seq seen, so missed
//   messages are replayed; duplicates (seq <= last seen) are dropped. `recovered: false`
//   is reported as a "gap" event: fetch that range over HTTP.
// - Requests carry a `rid`; replies resolve the matching promise, or it fails after a
//   timeout. A `send` not yet acknowledged is sent again, with the same `cid`, after every
//   reconnect (and after `unavailable` / `rate_limited`), so a lost ack never duplicates a
//   message: the server answers a repeated cid with the first message's id.

import { decode as msgpackDecode, encode as msgpackEncode } from "./msgpack.js";

/** The wire encodings: subprotocol, and how a frame is written and read. */
const CODECS = Object.freeze({
  json: {
    subprotocol: "chat.v1.json",
    encode: (frame) => JSON.stringify(frame),
    decode: (data) => JSON.parse(data),
  },
  msgpack: {
    subprotocol: "chat.v1.msgpack",
    encode: (frame) => msgpackEncode(frame),
    decode: (data) => msgpackDecode(data),
  },
});

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  TOO_LARGE: 1009,
  INTERNAL: 1011,
  TRY_AGAIN_LATER: 1013,
  UNAUTHORIZED: 4001,
  PROTOCOL_ERROR: 4002,
  RATE_LIMITED: 4008,
  SLOW_CONSUMER: 4009,
});

// Closes after which the client must change something before coming back.
const FINAL = new Set([CloseCode.NORMAL, CloseCode.TOO_LARGE, CloseCode.PROTOCOL_ERROR]);
// Request errors where nothing was accepted and the same request may simply be repeated.
const RETRIABLE = new Set(["unavailable", "rate_limited"]);
const MIN_REFUSAL_DELAY_MS = 1000;

export class AgoraError extends Error {
  constructor(code, message, { retryAfterMs = null, status = null, frame = null } = {}) {
    super(`${code}: ${message}`);
    this.name = "AgoraError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
    this.status = status;
    this.frame = frame;
  }
}

/** Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^attempt)). */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000 } = {}, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** The delay before the next connection attempt, after a close with `code`; null: stop. */
export function reconnectDelay(code, attempt, opts = {}, random = Math.random) {
  if (FINAL.has(code) || code === CloseCode.UNAUTHORIZED) return null;
  const delay = backoffDelay(attempt, opts, random);
  if (opts.retryAfterMs != null) return Math.max(delay, opts.retryAfterMs);
  if (opts.neverOpened || code === CloseCode.TRY_AGAIN_LATER || code === CloseCode.RATE_LIMITED) {
    return Math.max(delay, MIN_REFUSAL_DELAY_MS);
  }
  return delay;
}

function randomCid() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function withToken(url, token) {
  const u = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (token) u.searchParams.set("token", token);
  return u.toString();
}

export class AgoraClient {
  /**
   * @param {object} opts
   * @param {string|string[]|function(number):string} opts.url  WebSocket URL(s): a list is
   *   tried in turn, one per attempt (a load balancer's single URL is the usual case).
   * @param {string} [opts.token]
   * @param {number} [opts.requestTimeoutMs=10000]  per request on the wire
   * @param {number} [opts.sendTimeoutMs=60000]  a send fails if not acked within this
   * @param {{baseMs:number,maxMs:number}} [opts.backoff]
   * @param {number} [opts.stableMs=5000]  open this long, and the backoff starts over
   * @param {typeof WebSocket} [opts.WebSocket]
   * @param {"json"|"msgpack"} [opts.encoding="json"]  text frames of JSON, or binary
   *   frames of MessagePack (the same maps)
   * @param {function(): Promise<string>} [opts.tokenProvider]  a fresh token: sent as
   *   `auth` before the session's token expires (hello.exp, then each ok.exp), and used to
   *   reconnect after a 4001 instead of waiting for setToken
   * @param {number} [opts.refreshMarginMs=30000]  refresh this long before exp (at most
   *   half the token's remaining life)
   */
  constructor(opts) {
    const encoding = opts.encoding ?? "json";
    if (!Object.hasOwn(CODECS, encoding)) {
      throw new TypeError(`encoding must be "json" or "msgpack", not ${String(encoding)}`);
    }
    this.encoding = encoding;
    this._codec = CODECS[encoding];
    this.urls = opts.url;
    this.token = opts.token || null;
    this.tokenProvider = opts.tokenProvider || null;
    this.refreshMarginMs = opts.refreshMarginMs ?? 30000;
    this.refreshes = 0; // tokens the server took over an open connection
    this._refreshTimer = null;
    this._authFailures = 0; // 4001s in a row despite the provider's tokens
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 10000;
    this.sendTimeoutMs = opts.sendTimeoutMs ?? 60000;
    this.backoff = { baseMs: 500, maxMs: 30000, ...(opts.backoff || {}) };
    this.stableMs = opts.stableMs ?? 5000;
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    this.random = opts.random || Math.random;

    this.state = "idle"; // idle | connecting | open | waiting | unauthorized | closed
    this.hello = null;
    this.ws = null;
    this.attempt = 0;
    this.connects = 0; // successful connections so far (hello received)
    this.subs = new Map(); // conv -> { lastSeq: number|null, wanted: true }
    this._handlers = new Map();
    this._rid = 0;
    this._pending = new Map(); // rid -> { resolve, reject, timer, cid? }
    this._sends = new Map(); // cid -> { frame, resolve, reject, deadline, rid, retryTimer }
    this._timer = null; // the scheduled reconnect
    this._drainAt = null; // a `reconnect` frame said: not before this time
    this._stableTimer = null;
    this._watchdog = null;
    this._lastRecv = 0;
    this._probing = false;
    this._turn = 0;
  }

  // -- events ----------------------------------------------------------------------------
  /**
   * Listen to: open (hello), close ({code, reason, reconnectInMs}), state, msg, typing,
   * score, joined, gap ({conv, after, before}: fetch seqs in between over HTTP),
   * unsubbed ({conv, reason}: the server ended a subscription, it is forgotten here),
   * reconnecting ({afterMs}), unauthorized, error, frame (every frame, raw).
   */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type).delete(handler);
  }

  _emit(type, detail) {
    for (const h of this._handlers.get(type) || []) {
      try {
        h(detail);
      } catch (err) {
        console.error(`agora: ${type} handler failed`, err);
      }
    }
  }

  _setState(state) {
    if (this.state !== state) {
      this.state = state;
      this._emit("state", state);
    }
  }

  // -- lifecycle -------------------------------------------------------------------------
  connect() {
    if (this.state === "closed") this.state = "idle";
    if (this.ws || this._timer) return;
    this._open();
  }

  /** Stop for good: no reconnect; pending requests and sends fail. */
  close() {
    this._setState("closed");
    clearTimeout(this._timer);
    this._timer = null;
    this._stopTimers();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(1000);
      } catch (_) {
        /* already closing */
      }
    }
    this._failRequests(new AgoraError("closed", "client closed"));
    this._failSends(new AgoraError("closed", "client closed"));
  }

  /** A new token: used from the next connection on; reconnects at once after a 4001. */
  setToken(token) {
    this.token = token;
    if (this.state === "unauthorized") {
      this.attempt = 0;
      this._setState("idle");
      this._open();
    }
  }

  _url() {
    // Each attempt takes the next URL of a list: after a node drains or dies, the next
    // try goes to another one.
    const u = this.urls;
    const turn = this._turn++;
    let url;
    if (typeof u === "function") url = u(turn);
    else if (Array.isArray(u)) url = u[turn % u.length];
    else url = u;
    return withToken(url, this.token);
  }

  _open() {
    clearTimeout(this._timer);
    this._timer = null;
    if (this.state === "closed" || this.state === "unauthorized") return;
    this._setState("connecting");
    let ws;
    try {
      ws = new this.WebSocket(this._url(), this._codec.subprotocol);
      ws.binaryType = "arraybuffer"; // msgpack frames as bytes, not Blobs
    } catch (err) {
      this._onClose({ code: CloseCode.ABNORMAL, reason: String(err) }, false);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onerror = () => {}; // a close event always follows, with the code
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // a socket we already gave up on
      this.ws = null;
      this._onClose(ev, opened);
    };
  }

  _onClose(ev, opened) {
    this._stopTimers();
    const code = ev.code || CloseCode.ABNORMAL;
    const wasOpen = this.state === "open";
    this.hello = null;
    this._failRequests(new AgoraError("disconnected", `connection closed (${code})`));
    if (this.state === "closed") return;
    if (code === CloseCode.UNAUTHORIZED) {
      this._setState("unauthorized");
      this._emit("close", { code, reason: ev.reason, reconnectInMs: null });
      this._emit("unauthorized", { reason: ev.reason });
      if (this.tokenProvider) {
        // Ask for a token and come back, backing off if the provider's tokens fail too.
        const wait = backoffDelay(this._authFailures++, this.backoff, this.random);
        this._timer = setTimeout(() => {
          this._timer = null;
          this.tokenProvider().then(
            (token) => this.setToken(token),
            (err) => this._emit("error", { err }),
          );
        }, wait);
      }
      return;
    }
    // Runtimes that expose the refused handshake's status (not browsers) put it here.
    const retryAfterMs = ev.retryAfterMs ?? null;
    let delay = reconnectDelay(
      code,
      this.attempt,
      { ...this.backoff, neverOpened: !opened, retryAfterMs },
      this.random,
    );
    if (delay !== null && this._drainAt !== null) {
      // The node told us when to move: not before then (the server already spread us).
      delay = Math.max(0, this._drainAt - Date.now());
    }
    this._drainAt = null;
    if (delay === null) {
      this._setState("closed");
      this._emit("close", { code, reason: ev.reason, reconnectInMs: null });
      this._failSends(new AgoraError("closed", `server closed with ${code}`));
      return;
    }
    this.attempt += 1;
    clearTimeout(this._timer); // a drain's pending move, if the node closed us first
    this._setState("waiting");
    this._emit("close", { code, reason: ev.reason, reconnectInMs: delay, wasOpen });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _stopTimers() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    clearTimeout(this._stableTimer);
    clearInterval(this._watchdog);
    this._stableTimer = this._watchdog = null;
  }

  _failRequests(err) {
    for (const [rid, p] of this._pending) {
      clearTimeout(p.timer);
      this._pending.delete(rid);
      p.reject(err);
    }
  }

  _failSends(err) {
    for (const [cid, s] of this._sends) {
      // Both timers: a pending one would keep a Node process alive for sendTimeoutMs.
      clearTimeout(s.retryTimer);
      clearTimeout(s.expiry);
      this._sends.delete(cid);
      s.reject(err);
    }
  }

  // -- inbound ---------------------------------------------------------------------------
  _onMessage(data) {
    this._lastRecv = Date.now();
    let f;
    try {
      f = this._codec.decode(data);
    } catch (_) {
      return; // not a frame in our encoding: nothing sane to do with it
    }
    if (f === null || typeof f !== "object") return;
    this._emit("frame", f);
    if (typeof f.rid === "number" && this._pending.has(f.rid)) {
      const p = this._pending.get(f.rid);
      this._pending.delete(f.rid);
      clearTimeout(p.timer);
      if (f.t === "err") {
        p.reject(new AgoraError(f.code, f.msg, { retryAfterMs: f.retry_after_ms, frame: f }));
      } else p.resolve(f);
      return;
    }
    switch (f.t) {
      case "hello":
        return this._onHello(f);
      case "msg":
        return this._onMsg(f);
      case "reconnect":
        return this._onReconnect(f);
      case "unsubbed":
        this.subs.delete(String(f.conv)); // removed, left or closed: not resubscribed
        return this._emit("unsubbed", f);
      case "typing":
      case "score":
      case "joined":
      case "read":
      case "receipt":
      case "notify":
      case "presence":
      case "presence_count":
        return this._emit(f.t, f);
      default:
        return undefined;
    }
  }

  _onHello(f) {
    this.hello = f;
    this.connects += 1;
    this._setState("open");
    this._lastRecv = Date.now();
    // Backoff starts over only once a connection has proved stable.
    this._stableTimer = setTimeout(() => {
      this.attempt = 0;
      this._authFailures = 0;
    }, this.stableMs);
    const hb = Math.max(1000, f.hb || 25000);
    this._watchdog = setInterval(() => this._checkAlive(hb), hb / 2);
    this._emit("open", f);
    this._scheduleRefresh(f.exp);
    this._resume();
  }

  _scheduleRefresh(exp) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.tokenProvider || typeof exp !== "number") return;
    const left = exp * 1000 - Date.now(); // exp: seconds since the epoch, as in JWT
    const wait = Math.max(0, left - Math.min(this.refreshMarginMs, left / 2));
    this._refreshTimer = setTimeout(() => this._refresh(exp), wait);
  }

  async _refresh(exp) {
    const ws = this.ws;
    let token;
    try {
      token = await this.tokenProvider();
      if (this.ws !== ws || this.state !== "open") {
        this.token = token; // the connection is gone: the next one uses it
        return;
      }
      const ok = await this.request({ t: "auth", token });
      this.token = token;
      this.refreshes += 1;
      this._authFailures = 0;
      this._scheduleRefresh(ok.exp);
    } catch (err) {
      this._emit("error", { err });
      if (this.ws === ws && this.state === "open") {
        const left = exp * 1000 - Date.now();
        const retry = Math.min(5000, Math.max(500, left / 4));
        this._refreshTimer = setTimeout(() => this._refresh(exp), retry);
      }
    }
  }

  async _resume() {
    // Subscriptions first (so replays arrive before anything else), then unacked sends.
    const subs = [...this.subs.entries()].map(([conv, s]) =>
      this._sub(conv, s).catch((err) => this._emit("error", { conv, err })),
    );
    await Promise.all(subs);
    for (const s of this._sends.values()) this._transmit(s);
  }

  _checkAlive(hb) {
    if (this._probing || this.state !== "open" || Date.now() - this._lastRecv < hb) return;
    // Nothing heard for an interval: ask; no answer within another means a dead path.
    const ws = this.ws;
    this._probing = true;
    this.request({ t: "ping" }, hb)
      .catch(() => {
        if (this.ws === ws && this.state === "open") this._drop();
      })
      .finally(() => {
        this._probing = false;
      });
  }

  /** Give up on the current socket and reconnect (a dead path, or a drain's deadline). */
  _drop() {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try {
      ws.close(1000);
    } catch (_) {
      /* already closing */
    }
    this._onClose({ code: CloseCode.GOING_AWAY, reason: "client reconnect" }, true);
  }

  _onReconnect(f) {
    const after = Math.max(0, Number(f.after_ms) || 0);
    this._drainAt = Date.now() + after;
    // Move at that time even if the node has not closed us by then.
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this.ws && this._drainAt !== null) this._drop();
    }, after);
    this._emit("reconnecting", { afterMs: after });
  }

  _onMsg(f) {
    const sub = this.subs.get(f.conv);
    if (sub) {
      if (sub.lastSeq !== null && f.seq <= sub.lastSeq) return; // a duplicate
      if (sub.lastSeq !== null && f.seq > sub.lastSeq + 1) {
        this._emit("gap", { conv: f.conv, after: sub.lastSeq, before: f.seq });
      }
      sub.lastSeq = f.seq;
    }
    this._emit("msg", f);
  }

  // -- requests --------------------------------------------------------------------------
  /** Send a request frame; resolves with its reply, rejects with AgoraError. */
  request(frame, timeoutMs = this.requestTimeoutMs) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.state !== "open") {
        reject(new AgoraError("disconnected", "not connected"));
        return;
      }
      const rid = ++this._rid;
      const timer = setTimeout(() => {
        this._pending.delete(rid);
        reject(new AgoraError("timeout", `no reply to ${frame.t} within ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(rid, { resolve, reject, timer });
      this.ws.send(this._codec.encode({ ...frame, rid }));
    });
  }

  ping() {
    return this.request({ t: "ping" });
  }

  /** Follow a conversation (or a post's thread). Kept across reconnects until unsubscribe. */
  async subscribe(conv, { since = null } = {}) {
    conv = String(conv);
    let sub = this.subs.get(conv);
    if (!sub) {
      sub = { lastSeq: since };
      this.subs.set(conv, sub);
    } else if (since !== null && (sub.lastSeq === null || since > sub.lastSeq)) {
      sub.lastSeq = since;
    }
    if (this.state !== "open") return null; // sent on the next open
    return this._sub(conv, sub);
  }

  async _sub(conv, sub) {
    const frame = { t: "sub", conv };
    const since = sub.lastSeq;
    if (since !== null) frame.since = since;
    let reply;
    try {
      reply = await this.request(frame);
    } catch (err) {
      if (err.code === "forbidden" || err.code === "not_found") this.subs.delete(conv);
      throw err;
    }
    if (this.subs.get(conv) !== sub) return reply; // unsubscribed meanwhile
    if (since !== null && !reply.recovered && reply.seq > (sub.lastSeq ?? 0)) {
      this._emit("gap", { conv, after: sub.lastSeq, before: reply.seq + 1 });
    }
    if (sub.lastSeq === null || reply.seq > sub.lastSeq) sub.lastSeq = reply.seq;
    return reply;
  }

  async unsubscribe(conv) {
    conv = String(conv);
    this.subs.delete(conv);
    if (this.state === "open") return this.request({ t: "unsub", conv });
    return null;
  }

  /** The last seq seen in a subscribed conversation (null: none yet). */
  lastSeq(conv) {
    const sub = this.subs.get(String(conv));
    return sub ? sub.lastSeq : null;
  }

  /**
   * Send a message. Resolves with the `ack` once the server has durably accepted it.
   * Survives reconnects: it is sent again with the same cid until acked, refused, or
   * `sendTimeoutMs` passes.
   */
  send(conv, body, { cid = randomCid(), kind, replyTo } = {}) {
    const frame = { t: "send", conv: String(conv), cid, body };
    if (kind) frame.kind = kind;
    if (replyTo) frame.reply_to = String(replyTo);
    return this._submit(frame);
  }

  /** Edit your own message `ref`: an `edit` event with its own seq (retried like a send). */
  edit(conv, ref, body, { cid = randomCid() } = {}) {
    return this._submit({ t: "edit", conv: String(conv), cid, ref: String(ref), body });
  }

  /** Delete your own message `ref`: a tombstone stays, the text is gone. */
  deleteMessage(conv, ref, { cid = randomCid() } = {}) {
    return this._submit({ t: "delete", conv: String(conv), cid, ref: String(ref) });
  }

  /** Add (or with `remove: true`, take back) your reaction `emoji` to message `ref`. */
  react(conv, ref, emoji, { remove = false, cid = randomCid() } = {}) {
    return this._submit({ t: "react", conv: String(conv), cid, ref: String(ref), emoji, remove });
  }

  _submit(frame) {
    if (this.state === "closed") {
      return Promise.reject(new AgoraError("closed", "client closed"));
    }
    const cid = frame.cid;
    const existing = this._sends.get(cid);
    if (existing) return existing.promise;
    let entry;
    const promise = new Promise((resolve, reject) => {
      entry = { frame, resolve, reject, deadline: Date.now() + this.sendTimeoutMs };
    });
    entry.promise = promise;
    entry.expiry = setTimeout(() => {
      if (this._sends.get(cid) !== entry) return;
      this._sends.delete(cid);
      clearTimeout(entry.retryTimer);
      entry.reject(new AgoraError("timeout", `not acknowledged within ${this.sendTimeoutMs} ms`));
    }, this.sendTimeoutMs);
    this._sends.set(cid, entry);
    if (this.state === "open") this._transmit(entry);
    return promise;
  }

  /** Messages sent but not acknowledged yet (they are retried on reconnect). */
  get unacked() {
    return [...this._sends.values()].map((s) => s.frame);
  }

  _transmit(entry) {
    if (entry.inFlight || this._sends.get(entry.frame.cid) !== entry) return;
    entry.inFlight = true;
    this.request(entry.frame).then(
      (ack) => {
        entry.inFlight = false;
        if (this._sends.get(entry.frame.cid) !== entry) return;
        this._sends.delete(entry.frame.cid);
        clearTimeout(entry.expiry);
        entry.resolve(ack);
      },
      (err) => {
        entry.inFlight = false;
        if (this._sends.get(entry.frame.cid) !== entry) return;
        if (err.code === "disconnected") return; // resent after the reconnect
        if (err.code === "timeout" || RETRIABLE.has(err.code)) {
          // Nothing accepted (or we cannot tell): the same cid again, later.
          const wait = err.retryAfterMs ?? backoffDelay(1, this.backoff, this.random);
          clearTimeout(entry.retryTimer);
          entry.retryTimer = setTimeout(() => {
            if (this.state === "open") this._transmit(entry);
          }, wait);
          return;
        }
        this._sends.delete(entry.frame.cid);
        clearTimeout(entry.expiry);
        entry.reject(err);
      },
    );
  }

  /** Move your read pointer in `conv` to `seq` (forward only; your other devices get a
   * `read` event). Not kept while offline: send it again when it matters. */
  read(conv, seq) {
    if (this.state !== "open") return Promise.resolve(null);
    return this.request({ t: "read", conv: String(conv), seq });
  }

  /** Tell the conversation you are typing (ephemeral; throttle it in the UI). */
  typing(conv) {
    if (this.ws && this.state === "open") {
      this.ws.send(this._codec.encode({ t: "typing", conv: String(conv) }));
    }
  }
}

/** A small HTTP helper for the same API: JSON in and out, errors as AgoraError. */
export class AgoraHttp {
  constructor({ base = "", token = null, fetch: f } = {}) {
    this.base = base;
    this.token = token;
    this.fetch = f || globalThis.fetch.bind(globalThis);
  }

  async call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await this.fetch(this.base + path, init);
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null; // not ours (a proxy's HTML error page): report the status instead
    }
    if (!resp.ok) {
      const e = (data && data.error) || { code: "internal", message: resp.statusText };
      const ra = resp.headers.get("Retry-After");
      throw new AgoraError(e.code, e.message, {
        status: resp.status,
        retryAfterMs: ra ? Number(ra) * 1000 : null,
      });
    }
    return data;
  }

  get(path) {
    return this.call("GET", path);
  }

  post(path, body) {
    return this.call("POST", path, body);
  }

  put(path, body) {
    return this.call("PUT", path, body);
  }

  del(path) {
    return this.call("DELETE", path);
  }
}
