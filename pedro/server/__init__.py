"""pedro.server: the OpenAI-compatible multi-tenant HTTP API on the engine (``pedro serve``)."""

from pedro.server.app import create_app
from pedro.server.config import ServerConfig
from pedro.server.run import serve

__all__ = ["ServerConfig", "create_app", "serve"]
