"""Asyncio clients of Agora's wire protocol v1 (used by tests, bench/ and bots).

`AgoraClient` is one connection; `ReconnectingClient` keeps one open across drops, drains
and refusals, resubscribing with `since` and retrying unacknowledged sends by `cid`.
"""

from agora_client.client import AgoraClient, Closed, ServerError
from agora_client.policy import Backoff
from agora_client.resilient import ReconnectingClient

# The `agora-client` distribution's version (clients/python/pyproject.toml reads it).
__version__ = "0.2.0"

__all__ = ["AgoraClient", "Backoff", "Closed", "ReconnectingClient", "ServerError", "__version__"]
