// A scripted WebSocket for the client's pure tests: the test opens, feeds and closes it.
export class FakeSocket {
  static all = [];

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.binaryType = "blob";
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeSocket.all.push(this);
  }

  static reset() {
    FakeSocket.all = [];
  }

  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }

  send(data) {
    this.sent.push(data);
  }

  close(code) {
    this.closedWith = code;
  }

  // -- the server's side -------------------------------------------------------------
  open(hello = { t: "hello", user: "u", node: "n1", hb: 25000, max_frame: 65536 }) {
    this.onopen?.({});
    this.deliver(hello);
  }

  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }

  frames() {
    return this.sent.map((d) => JSON.parse(d));
  }
}

/** Poll `cond` until true (bounded): the client works on timers and promises. */
export async function until(cond, what, ms = 2000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
