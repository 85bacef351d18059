"""A small asyncio client of Agora's wire protocol v1 (used by tests, bench/ and bots)."""

from agora_client.client import AgoraClient, ServerError

__all__ = ["AgoraClient", "ServerError"]
