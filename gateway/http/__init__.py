"""The HTTP API of PROTOCOL.md, one module per resource."""
