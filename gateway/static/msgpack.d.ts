// Types of msgpack.js: the MessagePack codec of the `chat.v1.msgpack` subprotocol.

/** A value MessagePack carries; 64-bit integers past 2^53 decode as bigint. */
export type MsgpackValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | MsgpackValue[]
  | { [key: string]: MsgpackValue };

/** One value as MessagePack bytes (`undefined` map values are left out). */
export function encode(value: unknown): Uint8Array;

/** One value from MessagePack bytes; throws on truncated or trailing data. */
export function decode(data: Uint8Array | ArrayBuffer): MsgpackValue;
