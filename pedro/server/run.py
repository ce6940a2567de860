"""Starting a server process: load the backbone, the keys and the registry, then run uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from pedro.server.app import create_app
from pedro.server.auth import KeyRing
from pedro.server.backend import LocalBackend
from pedro.server.config import ServerConfig


def serve(config: ServerConfig) -> None:
    """Run ``pedro serve`` in this process until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = KeyRing.load(config.keys_file)  # before the backbone: a bad keys file fails in a second, not a minute
    backend = LocalBackend.from_config(config)
    try:
        app = create_app(config, backend, keys)
        uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        backend.shutdown()
