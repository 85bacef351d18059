// Types of agora.js, the client of Agora's wire protocol v1 (docs/protocol.md; the frames
// are also in docs/asyncapi.yaml). Checked by `tsc --noEmit` (clients/js).

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  TOO_LARGE: 1009;
  INTERNAL: 1011;
  TRY_AGAIN_LATER: 1013;
  UNAUTHORIZED: 4001;
  PROTOCOL_ERROR: 4002;
  RATE_LIMITED: 4008;
  SLOW_CONSUMER: 4009;
}>;

/** `err.code` and the HTTP `error.code`, plus the client's own (`closed`, `disconnected`,
 * `timeout`). */
export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "conflict"
  | "too_large"
  | "rate_limited"
  | "unavailable"
  | "internal"
  | "closed"
  | "disconnected"
  | "timeout";

export declare class AgoraError extends Error {
  constructor(
    code: ErrorCode | string,
    message: string,
    opts?: { retryAfterMs?: number | null; status?: number | null; frame?: ServerFrame | null },
  );
  readonly code: ErrorCode | string;
  readonly retryAfterMs: number | null;
  /** The HTTP status, for AgoraHttp errors. */
  readonly status: number | null;
  /** The `err` frame, for WebSocket request errors. */
  readonly frame: ServerFrame | null;
}

export interface BackoffOptions {
  baseMs: number;
  maxMs: number;
}

/** Full jitter: uniform in [0, min(maxMs, baseMs * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  opts?: Partial<BackoffOptions>,
  random?: () => number,
): number;

/** The delay before the next connection attempt after a close with `code`; null: stop. */
export declare function reconnectDelay(
  code: number,
  attempt: number,
  opts?: Partial<BackoffOptions> & { retryAfterMs?: number | null; neverOpened?: boolean },
  random?: () => number,
): number | null;

// -- frames (ids are decimal strings) -----------------------------------------------------

export interface Hello {
  t: "hello";
  user: string;
  node: string;
  hb: number;
  max_frame: number;
  /** The session token's `exp`, seconds since the epoch: closed (4001) at exp + leeway
   * unless renewed with `auth`. */
  exp?: number;
}
export interface Msg {
  t: "msg";
  conv: string;
  id: string;
  seq: number;
  from: string;
  body: string;
  ts: number;
  cid: string;
  /** A text or comment, or an event changing the message `ref` names. */
  kind: "text" | "comment" | "edit" | "delete" | "react" | "unreact";
  ref?: string;
  reply_to?: string;
  edited?: true;
  deleted?: true;
  /** Posted by a backend service (`from` is `service/<name>`). */
  service?: true;
}
export interface Read {
  t: "read";
  conv: string;
  seq: number;
}
export interface Receipt {
  t: "receipt";
  conv: string;
  user: string;
  seq: number;
}
export interface Notification {
  id: string;
  kind: "mention" | "reply" | "dm";
  conv: string;
  message: string;
  from: string;
  excerpt: string;
  ts: number;
  read: boolean;
}
export interface Notify {
  t: "notify";
  n: Notification;
}
export interface Presence {
  t: "presence";
  user: string;
  online: boolean;
  last_seen: number | null;
}
export interface PresenceCount {
  t: "presence_count";
  conv: string;
  online: number;
}
export interface Score {
  t: "score";
  post: string;
  score: number;
  up: number;
  down: number;
}
export interface Typing {
  t: "typing";
  conv: string;
  user: string;
}
export interface Subbed {
  t: "subbed";
  rid?: number;
  conv: string;
  seq: number;
  recovered: boolean;
}
export interface Ack {
  t: "ack";
  rid?: number;
  cid: string;
  id: string;
  ts: number;
}
export interface Ok {
  t: "ok";
  rid?: number;
  /** In the reply to `auth`: the new token's `exp` (seconds). */
  exp?: number;
}
export interface Pong {
  t: "pong";
  rid?: number;
}
export interface Err {
  t: "err";
  rid?: number;
  code: ErrorCode;
  msg: string;
  retry_after_ms?: number;
}
export interface Reconnect {
  t: "reconnect";
  after_ms: number;
}
export interface Conversation {
  id: string;
  kind: "direct" | "group" | "thread";
  title: string;
  members: string[];
  created_at: number;
  last_seq?: number;
  last_activity?: number;
}
export interface Joined {
  t: "joined";
  conv: Conversation;
}
export interface Unsubbed {
  t: "unsubbed";
  conv: string;
  reason: "removed" | "left" | "closed";
}
export type ServerFrame =
  | Hello
  | Msg
  | Score
  | Typing
  | Subbed
  | Ack
  | Ok
  | Pong
  | Err
  | Reconnect
  | Joined
  | Unsubbed
  | Read
  | Receipt
  | Notify
  | Presence
  | PresenceCount;

export type ClientFrame =
  | { t: "sub"; conv: string; since?: number; rid?: number }
  | { t: "unsub"; conv: string; rid?: number }
  | {
      t: "send";
      conv: string;
      cid: string;
      body: string;
      kind?: "text" | "comment";
      reply_to?: string;
      rid?: number;
    }
  | { t: "edit"; conv: string; cid: string; ref: string; body: string; rid?: number }
  | { t: "delete"; conv: string; cid: string; ref: string; rid?: number }
  | { t: "react"; conv: string; cid: string; ref: string; emoji: string; remove?: boolean; rid?: number }
  | { t: "read"; conv: string; seq: number; rid?: number }
  | { t: "typing"; conv: string; rid?: number }
  | { t: "ping"; rid?: number }
  | { t: "auth"; token: string; rid?: number };

// -- the client ---------------------------------------------------------------------------

export type ClientState = "idle" | "connecting" | "open" | "waiting" | "unauthorized" | "closed";
export type Encoding = "json" | "msgpack";

export interface Gap {
  conv: string;
  /** Last seq delivered before the gap (null: none). */
  after: number | null;
  /** First seq after the gap: fetch the seqs in between over HTTP. */
  before: number;
}

export interface CloseInfo {
  code: number;
  reason?: string;
  /** null: the client stopped (see `code`); else when it tries again. */
  reconnectInMs: number | null;
  wasOpen?: boolean;
}

export interface AgoraEvents {
  open: Hello;
  close: CloseInfo;
  state: ClientState;
  msg: Msg;
  typing: Typing;
  score: Score;
  joined: Joined;
  /** The server ended a subscription; the client forgets it (not resumed). */
  unsubbed: Unsubbed;
  read: Read;
  receipt: Receipt;
  notify: Notify;
  presence: Presence;
  presence_count: PresenceCount;
  gap: Gap;
  reconnecting: { afterMs: number };
  unauthorized: { reason?: string };
  error: { conv?: string; err: unknown };
  frame: ServerFrame;
}

/** What the client needs of a WebSocket constructor (browsers', Node's, or a test's). */
export interface WebSocketLike {
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason?: string; retryAfterMs?: number }) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocol: string) => WebSocketLike;

export interface AgoraClientOptions {
  /** A WebSocket URL, a list tried in turn (one per attempt), or a function of the turn. */
  url: string | string[] | ((turn: number) => string);
  token?: string | null;
  /** "json" (default, text frames) or "msgpack" (binary frames, the same maps). */
  encoding?: Encoding;
  requestTimeoutMs?: number;
  sendTimeoutMs?: number;
  backoff?: Partial<BackoffOptions>;
  stableMs?: number;
  WebSocket?: WebSocketConstructor;
  random?: () => number;
  /** A fresh token: sent as `auth` before the session's expires, and used to reconnect
   * after a 4001 instead of waiting for setToken. */
  tokenProvider?: () => Promise<string>;
  /** Refresh this long before `exp` (at most half the remaining life); default 30000. */
  refreshMarginMs?: number;
}

export declare class AgoraClient {
  constructor(opts: AgoraClientOptions);
  readonly encoding: Encoding;
  readonly state: ClientState;
  /** The current connection's `hello`, or null. */
  readonly hello: Hello | null;
  /** Connections that reached `hello` so far. */
  readonly connects: number;
  /** Tokens the server took over an open connection (`auth`). */
  readonly refreshes: number;
  /** Sends not acknowledged yet (they are retried on reconnect). */
  readonly unacked: ClientFrame[];

  on<K extends keyof AgoraEvents>(type: K, handler: (detail: AgoraEvents[K]) => void): () => void;
  connect(): void;
  /** Stop for good: no reconnect; pending requests and sends fail. */
  close(): void;
  /** A new token: used from the next connection on; reconnects at once after a 4001. */
  setToken(token: string): void;
  /** A request frame; resolves with its reply, rejects with AgoraError. */
  request(frame: ClientFrame, timeoutMs?: number): Promise<ServerFrame>;
  ping(): Promise<Pong>;
  /** Kept across reconnects until unsubscribe; null when sent on the next open. */
  subscribe(conv: string | number, opts?: { since?: number | null }): Promise<Subbed | null>;
  unsubscribe(conv: string | number): Promise<Ok | null>;
  lastSeq(conv: string | number): number | null;
  /** Resolves with the `ack` once durably accepted; retried with the same cid. */
  send(
    conv: string | number,
    body: string,
    opts?: { cid?: string; kind?: "text" | "comment"; replyTo?: string | null },
  ): Promise<Ack>;
  /** Edit your own message: an `edit` event with its own seq (retried like a send). */
  edit(conv: string | number, ref: string, body: string, opts?: { cid?: string }): Promise<Ack>;
  /** Delete your own message (a tombstone stays). */
  deleteMessage(conv: string | number, ref: string, opts?: { cid?: string }): Promise<Ack>;
  /** Add (or with `remove`, take back) your reaction. */
  react(
    conv: string | number,
    ref: string,
    emoji: string,
    opts?: { remove?: boolean; cid?: string },
  ): Promise<Ack>;
  /** Move your read pointer forward; null when not connected (not kept). */
  read(conv: string | number, seq: number): Promise<Ok | null>;
  typing(conv: string | number): void;
}

export declare class AgoraHttp {
  constructor(opts?: { base?: string; token?: string | null; fetch?: typeof fetch });
  base: string;
  token: string | null;
  call<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
  get<T = unknown>(path: string): Promise<T>;
  post<T = unknown>(path: string, body?: unknown): Promise<T>;
  put<T = unknown>(path: string, body?: unknown): Promise<T>;
  del<T = unknown>(path: string): Promise<T>;
}
