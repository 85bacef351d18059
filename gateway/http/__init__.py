"""The HTTP API of docs/protocol.md, one module per resource."""
