"""The wire protocol of docs/protocol.md, sans I/O: bytes in, frames and events out.

Nothing here imports asyncio or touches a socket; it is tested on its own.
"""
