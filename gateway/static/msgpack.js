// MessagePack for the `chat.v1.msgpack` subprotocol: a small dependency-free encoder and
// decoder, so the browser client needs no bundler for it (served at /static/msgpack.js).
//
// It covers what protocol frames hold: nil, booleans, integers, floats, strings, binary,
// arrays and maps (string keys). Integers beyond 2^53 decode as BigInt, so nothing is
// silently rounded (ids travel as decimal strings anyway). Extension types are refused.

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u8(v) {
    this.ensure(1);
    this.buf[this.pos++] = v;
  }

  head(tag, size, v) {
    this.ensure(1 + size);
    this.buf[this.pos++] = tag;
    if (size === 1) this.view.setUint8(this.pos, v);
    else if (size === 2) this.view.setUint16(this.pos, v);
    else if (size === 4) this.view.setUint32(this.pos, v);
    this.pos += size;
  }

  bytes(b) {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }
}

function writeInt(w, v) {
  if (v >= 0) {
    if (v < 0x80) return w.u8(v);
    if (v < 0x100) return w.head(0xcc, 1, v);
    if (v < 0x10000) return w.head(0xcd, 2, v);
    if (v < 0x100000000) return w.head(0xce, 4, v);
    w.ensure(9);
    w.buf[w.pos++] = 0xcf;
    w.view.setBigUint64(w.pos, BigInt(v));
    w.pos += 8;
    return undefined;
  }
  if (v >= -32) return w.u8(v & 0xff);
  if (v >= -0x80) {
    w.ensure(2);
    w.buf[w.pos++] = 0xd0;
    w.view.setInt8(w.pos++, v);
    return undefined;
  }
  if (v >= -0x8000) {
    w.ensure(3);
    w.buf[w.pos++] = 0xd1;
    w.view.setInt16(w.pos, v);
    w.pos += 2;
    return undefined;
  }
  if (v >= -0x80000000) {
    w.ensure(5);
    w.buf[w.pos++] = 0xd2;
    w.view.setInt32(w.pos, v);
    w.pos += 4;
    return undefined;
  }
  w.ensure(9);
  w.buf[w.pos++] = 0xd3;
  w.view.setBigInt64(w.pos, BigInt(v));
  w.pos += 8;
  return undefined;
}

function writeLength(w, n, fix, fixMax, t8, t16, t32) {
  if (fix !== null && n <= fixMax) w.u8(fix | n);
  else if (t8 !== null && n < 0x100) w.head(t8, 1, n);
  else if (n < 0x10000) w.head(t16, 2, n);
  else w.head(t32, 4, n);
}

function write(w, v, depth) {
  if (depth > 64) throw new TypeError("msgpack: nested too deep");
  if (v === null || v === undefined) return w.u8(0xc0);
  if (v === false) return w.u8(0xc2);
  if (v === true) return w.u8(0xc3);
  if (typeof v === "number") {
    if (Number.isSafeInteger(v)) return writeInt(w, v);
    w.ensure(9);
    w.buf[w.pos++] = 0xcb;
    w.view.setFloat64(w.pos, v);
    w.pos += 8;
    return undefined;
  }
  if (typeof v === "bigint") {
    if (v < -(2n ** 63n) || v >= 2n ** 64n) throw new RangeError("msgpack: integer out of range");
    w.ensure(9);
    w.buf[w.pos++] = v < 0n ? 0xd3 : 0xcf;
    if (v < 0n) w.view.setBigInt64(w.pos, v);
    else w.view.setBigUint64(w.pos, v);
    w.pos += 8;
    return undefined;
  }
  if (typeof v === "string") {
    const b = textEncoder.encode(v);
    writeLength(w, b.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    return w.bytes(b);
  }
  if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
    const b = v instanceof Uint8Array ? v : new Uint8Array(v);
    writeLength(w, b.length, null, 0, 0xc4, 0xc5, 0xc6);
    return w.bytes(b);
  }
  if (Array.isArray(v)) {
    writeLength(w, v.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of v) write(w, item, depth + 1);
    return undefined;
  }
  if (typeof v === "object") {
    const entries = Object.entries(v).filter(([, x]) => x !== undefined);
    writeLength(w, entries.length, 0x80, 15, null, 0xde, 0xdf);
    for (const [k, x] of entries) {
      write(w, k, depth + 1);
      write(w, x, depth + 1);
    }
    return undefined;
  }
  throw new TypeError(`msgpack: cannot encode ${typeof v}`);
}

/** One value as MessagePack bytes. */
export function encode(value) {
  const w = new Writer();
  write(w, value, 0);
  return w.buf.slice(0, w.pos);
}

class Reader {
  constructor(bytes) {
    this.buf = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.buf.length) throw new RangeError("msgpack: truncated data");
  }

  u8() {
    this.need(1);
    return this.buf[this.pos++];
  }

  num(kind, size) {
    this.need(size);
    const v = this.view[`get${kind}`](this.pos);
    this.pos += size;
    return v;
  }

  big(signed) {
    this.need(8);
    const v = signed ? this.view.getBigInt64(this.pos) : this.view.getBigUint64(this.pos);
    this.pos += 8;
    const small = v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER);
    return small ? Number(v) : v;
  }

  raw(n) {
    this.need(n);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  str(n) {
    return textDecoder.decode(this.raw(n));
  }
}

function read(r, depth) {
  if (depth > 64) throw new RangeError("msgpack: nested too deep");
  const tag = r.u8();
  if (tag < 0x80) return tag;
  if (tag >= 0xe0) return tag - 0x100;
  if (tag >= 0xa0 && tag <= 0xbf) return r.str(tag & 0x1f);
  if (tag >= 0x90 && tag <= 0x9f) return readArray(r, tag & 0x0f, depth);
  if (tag >= 0x80 && tag <= 0x8f) return readMap(r, tag & 0x0f, depth);
  switch (tag) {
    case 0xc0:
      return null;
    case 0xc2:
      return false;
    case 0xc3:
      return true;
    case 0xc4:
      return r.raw(r.u8()).slice();
    case 0xc5:
      return r.raw(r.num("Uint16", 2)).slice();
    case 0xc6:
      return r.raw(r.num("Uint32", 4)).slice();
    case 0xca:
      return r.num("Float32", 4);
    case 0xcb:
      return r.num("Float64", 8);
    case 0xcc:
      return r.u8();
    case 0xcd:
      return r.num("Uint16", 2);
    case 0xce:
      return r.num("Uint32", 4);
    case 0xcf:
      return r.big(false);
    case 0xd0:
      return r.num("Int8", 1);
    case 0xd1:
      return r.num("Int16", 2);
    case 0xd2:
      return r.num("Int32", 4);
    case 0xd3:
      return r.big(true);
    case 0xd9:
      return r.str(r.u8());
    case 0xda:
      return r.str(r.num("Uint16", 2));
    case 0xdb:
      return r.str(r.num("Uint32", 4));
    case 0xdc:
      return readArray(r, r.num("Uint16", 2), depth);
    case 0xdd:
      return readArray(r, r.num("Uint32", 4), depth);
    case 0xde:
      return readMap(r, r.num("Uint16", 2), depth);
    case 0xdf:
      return readMap(r, r.num("Uint32", 4), depth);
    default:
      throw new TypeError(`msgpack: unsupported type 0x${tag.toString(16)}`);
  }
}

function readArray(r, n, depth) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(read(r, depth + 1));
  return out;
}

function readMap(r, n, depth) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const k = read(r, depth + 1);
    if (typeof k !== "string" && typeof k !== "number") {
      throw new TypeError("msgpack: map keys must be strings or numbers");
    }
    // defineProperty: a "__proto__" key is data, never the object's prototype.
    Object.defineProperty(out, String(k), {
      value: read(r, depth + 1),
      enumerable: true,
      writable: true,
      configurable: true,
    });
  }
  return out;
}

/** One MessagePack value from bytes (Uint8Array or ArrayBuffer); the whole input. */
export function decode(data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  const r = new Reader(bytes);
  const value = read(r, 0);
  if (r.pos !== bytes.length) throw new RangeError("msgpack: trailing bytes");
  return value;
}
