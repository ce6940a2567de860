"""A real ``pedro serve`` in a child process, started and stopped from Python, and the HTTP helpers its clients use.

The server tests and ``benchmarks/serve.py`` need exactly what a user runs (a separate process, a TCP port,
uvicorn), not an in-process test client, so that disconnects, kills and restarts are real. Only the standard
library and httpx: the benchmark imports this module without the test suite's fixtures.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``pedro serve --config <config> --port <free port>`` on 127.0.0.1; output goes to ``log``."""

    def __init__(
        self, config: Path, log: Path, extra_args: tuple[str, ...] = (), startup_timeout: float = 180.0
    ) -> None:
        self.config, self.log, self.extra_args, self.startup_timeout = (
            Path(config),
            Path(log),
            extra_args,
            startup_timeout,
        )
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        """Start and wait until /health answers; raises RuntimeError with the log's tail if it dies first."""
        if self.proc is not None:
            raise RuntimeError("this ServerProcess was already started")
        timeout = self.startup_timeout
        command = [
            sys.executable,
            "-m",
            "pedro.cli",
            "serve",
            "--config",
            str(self.config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pedro serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"pedro serve did not become healthy in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the server can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def auth(key: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"Authorization": f"Bearer {key}"}


def upload(
    url: str,
    key: Optional[str],
    name: Optional[str],
    directory: Path,
    files: Optional[dict[str, bytes]] = None,
    timeout: float = 60.0,
    **fields: str,
) -> httpx.Response:
    """POST /v1/adapters multipart with the adapter's files (or ``files``: filename -> bytes)."""
    if files is None:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    data = {**({"name": name} if name is not None else {}), **fields}
    parts = [("files", (filename, content)) for filename, content in files.items()]
    return httpx.post(f"{url}/v1/adapters", headers=auth(key) if key else {}, data=data, files=parts, timeout=timeout)
