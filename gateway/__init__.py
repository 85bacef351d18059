"""The WebSocket and HTTP gateway: stateless nodes holding client connections."""
