"""The WebSocket and HTTP gateway: stateless nodes holding client connections."""

# The one version of the `agora` distribution: pyproject.toml reads it from here
# (setuptools' dynamic version), `agora --version` prints it, `/healthz` answers it, and
# CHANGELOG.md's newest entry names it (tests/unit/test_packaging.py).
__version__ = "0.2.0"
