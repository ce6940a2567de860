"""LocalBackend: what the HTTP layer needs from one engine, in one process.

It turns an API request into engine token ids (Engine.encode with the server's prompt limit, on a worker
thread so tokenising never stalls the event loop; a prompt over the limit is refused with 400
``context_length_exceeded`` before it can take a slot), maps the engine's admission control (``max_queued``
requests waiting beyond the running batch, ``max_requests_per_tenant`` per tenant, then QueueFull) to 429,
streams the engine's outputs, maps a request the engine failed alone to a 4xx naming why (its adapter did not
load, or overflowed) and an engine restart to 503, and checks / registers / removes adapters. The Ray Serve deployment (ray_app.py) wraps the same class in each replica, so
single-process and scaled-out serving run identical request code.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, AsyncGenerator, Optional, Protocol, Union

from pedro.engine import (
    ADAPTER_LOAD_FAILED,
    ENGINE_FAILURE,
    NUMERIC_OVERFLOW,
    AdapterError,
    AsyncEngine,
    Engine,
    EngineDead,
    PromptTooLong,
    QueueFull,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    TenantLimit,
    UnknownAdapter,
)
from pedro.server.config import ServerConfig
from pedro.server.errors import APIError
from pedro.server.validate import InvalidAdapter, check_adapter

Prompt = Union[str, list[int], list[dict[str, str]]]
_ids = itertools.count()


# SamplingParams fields whose API name differs
_API_NAMES = {"max_new_tokens": "max_tokens"}


def refused(err: RequestError, param: Optional[str] = None) -> APIError:
    """The HTTP error for a request the engine refused: 429 when it is at capacity, 400 otherwise, naming the
    field at fault (the engine's, else ``param``)."""
    if isinstance(err, TenantLimit):  # this caller's own bound, not the server's: a code of its own
        return APIError(429, str(err), code="tenant_limit", retry_after=1)
    if isinstance(err, QueueFull):
        return APIError(429, f"the server is at capacity: {err}", code="queue_full", retry_after=1)
    if isinstance(err, UnknownAdapter):  # deleted after the request found it: as if it had never been there
        return APIError(
            404, "the model or adapter does not exist (it was deleted)", code="model_not_found", param="model"
        )
    code = "context_length_exceeded" if isinstance(err, PromptTooLong) else None
    field = _API_NAMES.get(err.field, err.field) if err.field else param
    return APIError(400, str(err), code=code, param=field)


def unavailable(err: EngineDead) -> APIError:
    """The HTTP error for a call that finds the engine thread stopped: 503, retry elsewhere or later."""
    return APIError(503, f"the engine is not running: {err}", code="engine_unavailable")


class Backend(Protocol):
    """What app.py and tenancy.py call: LocalBackend here, RayBackend (ray_app.py) in front of Ray replicas."""

    async def stream_all(
        self, wanted: list[tuple[Prompt, SamplingParams, Optional[bool]]], adapter: Optional[str], tenant: Optional[str]
    ) -> list[AsyncGenerator[RequestOutput, None]]:
        """One stream per (prompt, sampling, raw_prompt), admitted together. Generators, not just iterators:
        closing one early (``aclose``) aborts its engine request."""

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
            max_per_tenant=config.max_requests_per_tenant,
            dtype=config.dtype,
            device=config.device,
            exact_gemms=config.exact_gemms,
        )
        return cls(engine, config)

    # ------------------------------------------------------------------------------------------ requests

    def encode(self, prompt: Prompt, adapter: Optional[str] = None, raw_prompt: Optional[bool] = None) -> list[int]:
        """Token ids for a completion prompt (token ids as given; text as ``adapter``'s training encoded its
        prompts, unless ``raw_prompt`` says otherwise -- see ``raw_text``) or chat messages (the chat template)."""
        param = "messages" if prompt and isinstance(prompt, list) and isinstance(prompt[0], dict) else "prompt"
        try:
            raw = self.raw_text(adapter) if raw_prompt is None else raw_prompt
            return self.engine.encode(prompt, raw_prompt=raw, max_tokens=self.config.max_prompt_tokens)
        except RequestError as err:
            raise refused(err, param) from None
        except AdapterError as err:
            raise APIError(400, str(err), param=param) from None

    def raw_text(self, adapter: Optional[str]) -> bool:
        """Whether a completion's text prompt goes to the model as it is: yes for the base model (OpenAI's
        completions) and for an adapter without a recorded prompt format; an adapter that ``pedro train``
        trained on chat-templated prompts gets the chat template, exactly as training saw its prompts."""
        return adapter is None or self.engine.prompt_format(adapter) != "chat_template"

    async def stream(
        self,
        prompt: Prompt,
        adapter: Optional[str],
        sampling: SamplingParams,
        tenant: Optional[str] = None,
        raw_prompt: Optional[bool] = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Encode, admit, run; yields the engine's outputs. Leaving early aborts the request and frees its slot.
        ``tenant`` is the engine's fairness key and per-tenant limit; ``raw_prompt`` overrides how a text
        prompt is encoded (None: as the adapter was trained, see ``raw_text``)."""
        (outputs,) = await self.stream_all([(prompt, sampling, raw_prompt)], adapter, tenant)
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()

    async def stream_all(
        self, wanted: list[tuple[Prompt, SamplingParams, Optional[bool]]], adapter: Optional[str], tenant: Optional[str]
    ) -> list[AsyncGenerator[RequestOutput, None]]:
        """``stream`` for several (prompt, sampling, raw_prompt), all admitted together: the engine gets them in
        one command, so the n samples of a prompt share one prefill whatever else arrives meanwhile. Raises the
        HTTP error of the first that cannot run; then none runs."""
        ids = await asyncio.to_thread(lambda: [self.encode(p, adapter, raw) for p, _, raw in wanted])
        requests = [
            Request(i, adapter=adapter, sampling=s, tenant=tenant, request_id=f"srv-{next(_ids)}")
            for i, (_, s, _) in zip(ids, wanted)
        ]
        try:
            outputs = await self.async_engine.open(requests)
        except RequestError as err:
            raise refused(err) from None
        except EngineDead as err:
            raise unavailable(err) from None
        return [self._served(o) for o in outputs]

    async def _served(self, outputs: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[RequestOutput, None]:
        """One admitted request's outputs, an error output raised as its HTTP error; counted while in flight."""
        self.in_flight += 1
        try:
            async for out in outputs:
                if out.finish_reason == "error":
                    raise failure(out)
                yield out
        except EngineDead as err:
            raise unavailable(err) from None
        finally:
            self.in_flight -= 1
            await outputs.aclose()

    def stats(self) -> dict[str, float]:
        """Cheap, approximate reads of engine state for /health and /metrics (no lock: they are gauges)."""
        return {
            "running": self.engine.num_running,
            "waiting": self.engine.num_waiting,
            "in_flight": self.in_flight,
            "engine_restarts": self.async_engine.restarts,
        }

    async def ready(self) -> bool:
        """The engine is built before the app starts, so a local server is ready while its engine thread runs
        (False for good once it has stopped: /health then answers 503)."""
        return self.async_engine.alive

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
        except EngineDead as err:
            raise unavailable(err) from None

    async def remove_adapter(self, engine_name: str) -> None:
        try:
            await self.async_engine.remove_adapter(engine_name)
        except AdapterError as err:
            raise APIError(409, f"cannot remove the adapter now: {err}", code="adapter_in_use") from None
        except EngineDead as err:
            raise unavailable(err) from None

    def shutdown(self) -> None:
        self.async_engine.shutdown()


def failure(out: RequestOutput) -> APIError:
    """The HTTP error for a request the engine finished with an error: the request's own adapter at fault is a
    400 naming why; an engine restart is a retryable 503."""
    if out.error_code in (ADAPTER_LOAD_FAILED, NUMERIC_OVERFLOW):
        return APIError(400, out.error or out.error_code, code=out.error_code, param="model")
    if out.error_code == ENGINE_FAILURE:
        return APIError(503, out.error or "the engine was restarted", code="engine_restarted", retry_after=1)
    return APIError(500, f"the request failed in the engine: {out.error}", code=out.error_code)
