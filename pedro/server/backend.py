"""LocalBackend: what the HTTP layer needs from one engine, in one process.

It turns an API request into engine token ids (Engine.encode, then the server's prompt limit, so a prompt over
the limit is refused with 400 before it can take a slot), maps the engine's admission control (``max_queued``
requests waiting beyond the running batch, then QueueFull) to 429, streams the engine's outputs, and checks /
registers / removes adapters. The Ray Serve deployment (ray_app.py) wraps the same class in each replica, so
single-process and scaled-out serving run identical request code.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Protocol, Union

from pedro.engine import AdapterError, AsyncEngine, Engine, QueueFull, Request, RequestError, RequestOutput, SamplingParams
from pedro.server.config import ServerConfig
from pedro.server.errors import APIError
from pedro.server.validate import InvalidAdapter, check_adapter

Prompt = Union[str, list[int], list[dict[str, str]]]
_ids = itertools.count()


class Backend(Protocol):
    """What app.py and tenancy.py call: LocalBackend here, RayBackend (ray_app.py) in front of Ray replicas."""

    def stream(self, prompt: Prompt, adapter: Optional[str], sampling: SamplingParams) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...

    async def check(self, directory: Path) -> dict[str, Any]: ...

    async def add_adapter(self, engine_name: str, directory: Path) -> None: ...

    async def remove_adapter(self, engine_name: str) -> None: ...


class LocalBackend:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.async_engine = AsyncEngine(engine)
        self.in_flight = 0

    @classmethod
    def from_config(cls, config: ServerConfig) -> "LocalBackend":
        engine = Engine(
            config.backbone,
            max_batch=config.max_batch,
            max_seq_len=config.max_seq_len,
            max_prefill_tokens=config.max_prefill_tokens,
            adapter_capacity=config.adapter_capacity,
            max_waiting=config.max_queued,
            dtype=config.dtype,
        )
        return cls(engine, config)

    # ------------------------------------------------------------------------------------------ requests

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a completion prompt (text or ids, no template) or chat messages (the chat template)."""
        param = "messages" if prompt and isinstance(prompt, list) and isinstance(prompt[0], dict) else "prompt"
        try:
            ids = self.engine.encode(prompt, raw_prompt=True)
        except RequestError as err:
            raise APIError(400, str(err), param=param) from None
        if len(ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.config.max_prompt_tokens}",
                code="context_length_exceeded",
                param="prompt",
            )
        return ids

    async def stream(self, prompt: Prompt, adapter: Optional[str], sampling: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Encode, admit, run; yields the engine's outputs. Leaving early aborts the request and frees its slot."""
        ids = self.encode(prompt)
        self.in_flight += 1
        try:
            request = Request(ids, adapter=adapter, sampling=sampling, request_id=f"srv-{next(_ids)}")
            try:
                async for out in self.async_engine.stream(request):
                    if out.finish_reason == "error":
                        raise APIError(500, f"the request failed in the engine: {out.error}")
                    yield out
            except QueueFull as err:
                raise APIError(429, f"the server is at capacity: {err}", code="queue_full", retry_after=1) from None
            except RequestError as err:
                raise APIError(400, str(err)) from None
        finally:
            self.in_flight -= 1

    def stats(self) -> dict[str, float]:
        """Cheap, approximate reads of engine state for /health and /metrics (no lock: they are gauges)."""
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting, "in_flight": self.in_flight}

    async def ready(self) -> bool:
        """The engine is built before the app starts, so a local server is ready as soon as it answers."""
        return True

    # ------------------------------------------------------------------------------------------ adapters

    async def check(self, directory: Path) -> dict[str, Any]:
        """Full validation of an adapter directory against this backbone (in a worker thread: it reads files)."""
        try:
            return await asyncio.to_thread(check_adapter, directory, self.engine.check_adapter)
        except InvalidAdapter as err:
            raise APIError(400, f"adapter refused: {err}", param="adapter") from None

    async def add_adapter(self, engine_name: str, directory: Path) -> None:
        try:
            await self.async_engine.add_adapter(engine_name, directory)
        except AdapterError as err:
            raise APIError(400, f"adapter refused: {err}", param="adapter") from None

    async def remove_adapter(self, engine_name: str) -> None:
        try:
            await self.async_engine.remove_adapter(engine_name)
        except AdapterError as err:
            raise APIError(409, f"cannot remove the adapter now: {err}", code="adapter_in_use") from None

    def shutdown(self) -> None:
        self.async_engine.shutdown()
