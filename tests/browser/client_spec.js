// Scenarios for /static/agora.js, run inside Chromium against a scripted fake WebSocket
// (tests/integration/test_browser.py evaluates this file in a page served by a gateway).
// The body of an async function: it returns {scenario: "ok" | "error text"}.

const { AgoraClient, backoffDelay, reconnectDelay } = await import("/static/agora.js");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(pred, ms = 2000, what = "condition") {
  const until = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

function eq(a, b, msg) {
  const [x, y] = [JSON.stringify(a), JSON.stringify(b)];
  if (x !== y) throw new Error(`${msg}: ${x} != ${y}`);
}

// A server played by the scenario: every socket the client opens lands in `sockets`.
function fakeServer({ autoOpen = true, hello = () => ({}) } = {}) {
  const server = { sockets: [], opened: [], onFrame: null };
  class FakeWebSocket {
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.sent = [];
      this.readyState = 0;
      this.createdAt = Date.now();
      server.sockets.push(this);
      if (autoOpen) setTimeout(() => this.accept(), 0);
    }
    send(data) {
      const f = JSON.parse(data);
      this.sent.push(f);
      if (server.onFrame) server.onFrame(this, f);
    }
    close(code = 1000) {
      this.drop(code);
    }
    // -- the server's side
    accept() {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      if (this.onopen) this.onopen({});
      this.push({
        t: "hello", user: "u", node: `n${server.sockets.length}`, hb: 25000, max_frame: 65536, ...hello(),
      });
    }
    push(frame) {
      if (this.readyState === 1 && this.onmessage) this.onmessage({ data: JSON.stringify(frame) });
    }
    drop(code, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose && this.onclose({ code, reason }), 0);
    }
  }
  server.WebSocket = FakeWebSocket;
  server.last = () => server.sockets[server.sockets.length - 1];
  return server;
}

function client(server, extra = {}) {
  return new AgoraClient({
    url: "ws://fake.invalid/v1/ws",
    token: "t1",
    WebSocket: server.WebSocket,
    backoff: { baseMs: 20, maxMs: 40 },
    requestTimeoutMs: 500,
    ...extra,
  });
}

// Answers sub with subbed (seq: latest), optionally replaying msgs first.
function subReplies(server, latest, replay = () => []) {
  server.onFrame = (ws, f) => {
    if (f.t !== "sub") return;
    for (const m of replay(f)) ws.push(m);
    ws.push({ t: "subbed", rid: f.rid, conv: f.conv, seq: latest(), recovered: f.since !== undefined });
  };
}

const msg = (seq, cid = `c${seq}`) => ({
  t: "msg", conv: "1", id: String(100 + seq), seq, from: "x", body: `m${seq}`, ts: Date.now(), cid, kind: "text",
});

const scenarios = {
  async backoff_rules() {
    const lo = () => 0;
    const hi = () => 0.999999;
    assert(backoffDelay(0, { baseMs: 500, maxMs: 30000 }, hi) < 500, "attempt 0 under base");
    assert(backoffDelay(20, { baseMs: 500, maxMs: 30000 }, hi) < 30000, "capped");
    eq(backoffDelay(5, {}, lo), 0, "full jitter reaches 0");
    for (const code of [1000, 1009, 4001, 4002]) eq(reconnectDelay(code, 0), null, `no retry on ${code}`);
    assert(reconnectDelay(1013, 0, {}, lo) >= 1000, "1013 waits at least a second");
    assert(reconnectDelay(4008, 0, {}, lo) >= 1000, "4008 waits at least a second");
    assert(reconnectDelay(1006, 0, { neverOpened: true }, lo) >= 1000, "a refusal waits a second");
    eq(reconnectDelay(1006, 0, { retryAfterMs: 5000 }, lo), 5000, "Retry-After is a floor");
    eq(reconnectDelay(1001, 0, {}, lo), 0, "1001 plain jitter");
  },

  async resubscribe_with_since_and_drop_duplicates() {
    const server = fakeServer();
    let latest = 0;
    subReplies(server, () => latest, (f) => (f.since === 2 ? [msg(2), msg(3)] : []));
    const c = client(server);
    const seen = [];
    c.on("msg", (m) => seen.push(m.seq));
    c.connect();
    await waitFor(() => c.state === "open");
    await c.subscribe("1");
    const ws1 = server.last();
    ws1.push(msg(1));
    ws1.push(msg(2));
    ws1.push(msg(2));
    ws1.push(msg(1));
    latest = 3;
    ws1.drop(1006);
    await waitFor(() => server.sockets.length === 2 && c.state === "open", 2000, "reconnect");
    await waitFor(() => seen.length === 3, 1000, "replay");
    const sub = server.last().sent.find((f) => f.t === "sub");
    eq(sub.since, 2, "resubscribed from the last seq seen");
    eq(seen, [1, 2, 3], "each message once, in order");
    eq(c.lastSeq("1"), 3, "tracked seq");
    c.close();
  },

  async gap_is_reported() {
    const server = fakeServer();
    subReplies(server, () => 0);
    const c = client(server);
    const gaps = [];
    c.on("gap", (g) => gaps.push(g));
    c.connect();
    await waitFor(() => c.state === "open");
    await c.subscribe("1");
    server.last().push(msg(1));
    server.last().push(msg(4));
    eq(gaps, [{ conv: "1", after: 1, before: 4 }], "a seq jump is a gap");
    c.close();
  },

  async unacked_send_is_retried_with_the_same_cid_after_reconnect() {
    const server = fakeServer();
    let acks = 0;
    server.onFrame = (ws, f) => {
      if (f.t === "sub") ws.push({ t: "subbed", rid: f.rid, conv: f.conv, seq: 0, recovered: false });
      if (f.t === "send" && server.sockets.length === 1) ws.drop(1001); // the ack is lost
      if (f.t === "send" && server.sockets.length === 2) {
        acks += 1;
        ws.push({ t: "ack", rid: f.rid, cid: f.cid, id: "77", ts: 1 });
      }
    };
    const c = client(server);
    c.connect();
    await waitFor(() => c.state === "open");
    await c.subscribe("1");
    const ack = await c.send("1", "hello", { cid: "cid-1" });
    eq(ack.id, "77", "acked after the reconnect");
    const first = server.sockets[0].sent.filter((f) => f.t === "send");
    const second = server.sockets[1].sent.filter((f) => f.t !== "ping");
    eq(first.map((f) => f.cid), ["cid-1"], "sent once on the first socket");
    eq(second.map((f) => [f.t, f.cid]), [["sub", undefined], ["send", "cid-1"]], "resubscribe, then the same cid");
    eq(acks, 1, "one ack");
    eq(c.unacked, [], "nothing left pending");
    c.close();
  },

  async retriable_errors_resend_the_same_cid() {
    const server = fakeServer();
    let tries = 0;
    server.onFrame = (ws, f) => {
      if (f.t !== "send") return;
      tries += 1;
      if (tries === 1) ws.push({ t: "err", rid: f.rid, code: "unavailable", msg: "kafka down", retry_after_ms: 30 });
      else if (tries === 2) ws.push({ t: "err", rid: f.rid, code: "rate_limited", msg: "slow down", retry_after_ms: 30 });
      else ws.push({ t: "ack", rid: f.rid, cid: f.cid, id: "9", ts: 1 });
    };
    const c = client(server);
    c.connect();
    await waitFor(() => c.state === "open");
    const ack = await c.send("1", "x", { cid: "same" });
    eq(ack.id, "9", "eventually acked");
    eq(server.last().sent.map((f) => f.cid), ["same", "same", "same"], "always the same cid");
    let refused = null;
    server.onFrame = (ws, f) => ws.push({ t: "err", rid: f.rid, code: "forbidden", msg: "no" });
    await c.send("1", "y").catch((e) => (refused = e.code));
    eq(refused, "forbidden", "a final error rejects");
    c.close();
  },

  async unauthorized_waits_for_a_new_token() {
    const server = fakeServer();
    const c = client(server);
    let told = 0;
    c.on("unauthorized", () => (told += 1));
    c.connect();
    await waitFor(() => c.state === "open");
    server.last().drop(4001, "token expired");
    await waitFor(() => c.state === "unauthorized");
    await sleep(200);
    eq(server.sockets.length, 1, "no reconnect with the old token");
    eq(told, 1, "told once");
    c.setToken("t2");
    await waitFor(() => c.state === "open");
    eq(server.sockets.length, 2, "reconnected once");
    assert(server.last().url.includes("token=t2"), `new token in the URL: ${server.last().url}`);
    c.close();
  },

  async token_is_refreshed_with_auth_before_it_expires() {
    // hello.exp in 2 s; refreshed (auth) 1 s before, then again before each ok.exp.
    const expIn = (s) => Math.floor(Date.now() / 1000) + s;
    const server = fakeServer({ hello: () => ({ exp: expIn(2) }) });
    server.onFrame = (ws, f) => {
      if (f.t === "auth") ws.push({ t: "ok", rid: f.rid, exp: expIn(2) });
    };
    let issued = 0;
    const c = client(server, {
      refreshMarginMs: 1000,
      tokenProvider: async () => `fresh${++issued}`,
    });
    c.connect();
    await waitFor(() => c.refreshes >= 2, 5000, "two refreshes");
    const auths = server.last().sent.filter((f) => f.t === "auth").map((f) => f.token);
    eq(auths.slice(0, 2), ["fresh1", "fresh2"], "each fresh token sent as auth");
    eq(server.sockets.length, 1, "no reconnect");
    assert(c.token.startsWith("fresh"), `the newest token is kept: ${c.token}`);
    c.close();
  },

  async unauthorized_with_a_provider_reconnects_with_a_fresh_token() {
    const server = fakeServer();
    const c = client(server, { tokenProvider: async () => "t-new" });
    c.connect();
    await waitFor(() => c.state === "open");
    server.last().drop(4001, "token expired");
    await waitFor(() => server.sockets.length === 2 && c.state === "open", 2000, "reconnect");
    assert(server.last().url.includes("token=t-new"), `fresh token in the URL: ${server.last().url}`);
    c.close();
  },

  async unsubbed_forgets_the_subscription() {
    const server = fakeServer();
    subReplies(server, () => 0);
    const c = client(server);
    const told = [];
    c.on("unsubbed", (f) => told.push(f.reason));
    c.connect();
    await waitFor(() => c.state === "open");
    await c.subscribe("1");
    await c.subscribe("2");
    server.last().push({ t: "unsubbed", conv: "1", reason: "removed" });
    eq(told, ["removed"], "told why");
    server.last().drop(1006);
    await waitFor(() => server.sockets.length === 2 && c.state === "open", 2000, "reconnect");
    await sleep(50);
    const subs = server.last().sent.filter((f) => f.t === "sub").map((f) => f.conv);
    eq(subs, ["2"], "only the subscription still held is resumed");
    c.close();
  },

  async drain_reconnect_honours_after_ms() {
    const server = fakeServer();
    const c = client(server, { backoff: { baseMs: 1, maxMs: 1 } });
    c.connect();
    await waitFor(() => c.state === "open");
    const t0 = Date.now();
    server.last().push({ t: "reconnect", after_ms: 150 });
    await sleep(30);
    server.last().drop(1001); // the node closes early: still wait for after_ms
    await waitFor(() => server.sockets.length === 2, 2000, "second socket");
    const waited = server.last().createdAt - t0;
    assert(waited >= 140, `reconnected after ${waited} ms, before after_ms`);
    // A node that never closes: the client leaves by itself at after_ms.
    await waitFor(() => c.state === "open");
    const t1 = Date.now();
    server.last().push({ t: "reconnect", after_ms: 100 });
    await waitFor(() => server.sockets.length === 3, 2000, "third socket");
    const moved = server.last().createdAt - t1;
    assert(moved >= 90 && moved < 600, `moved after ${moved} ms`);
    assert(server.sockets[1].readyState === 3, "old socket closed");
    c.close();
  },

  async refused_handshake_backs_off_at_least_a_second() {
    const server = fakeServer({ autoOpen: false });
    const c = client(server, { random: () => 0 });
    c.connect();
    await waitFor(() => server.sockets.length === 1);
    server.last().drop(1006); // never opened: what a 503 looks like to a browser
    await sleep(600);
    eq(server.sockets.length, 1, "no retry within the Retry-After floor");
    await waitFor(() => server.sockets.length === 2, 1500, "retry after a second");
    c.close();
  },

  async requests_time_out_and_replies_match_by_rid() {
    const server = fakeServer();
    server.onFrame = (ws, f) => {
      if (f.t === "ping" && f.rid % 2 === 0) ws.push({ t: "pong", rid: f.rid });
    };
    const c = client(server, { requestTimeoutMs: 100 });
    c.connect();
    await waitFor(() => c.state === "open");
    let err = null;
    await c.ping().catch((e) => (err = e.code)); // rid 1: never answered
    eq(err, "timeout", "unanswered request times out");
    const pong = await c.ping(); // rid 2: answered
    eq(pong.t, "pong", "answered");
    c.close();
  },
};

const results = {};
for (const [name, fn] of Object.entries(scenarios)) {
  try {
    await fn();
    results[name] = "ok";
  } catch (err) {
    results[name] = String(err && err.stack ? err.stack : err);
  }
}
return results;
