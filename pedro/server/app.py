"""The FastAPI application: OpenAI-compatible generation, adapter management, health and metrics.

Generation streams from the backend; for ``stream=true`` the first engine output is awaited *before* the 200
and the SSE headers go out, so every refusal (bad adapter, prompt too long, queue full) is a proper HTTP error,
not an error event inside a 200 stream. A client that goes away is noticed both while waiting (polling
``is_disconnected``) and while streaming (Starlette cancels the response), and either way the engine request is
aborted and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pedro.engine import RequestError, RequestOutput, SamplingParams
from pedro.server.adapter_registry import AdapterRecord, AdapterRegistry
from pedro.server.auth import KeyRing, Principal
from pedro.server.backend import Backend, refused
from pedro.server.config import ServerConfig
from pedro.server.errors import APIError, internal_error
from pedro.server.generation import (
    Choice,
    chat_logprobs,
    choices,
    completion_logprobs,
    merged,
    new_logprobs,
    open_all,
    streamed,
    usage_counts,
)
from pedro.server.metrics import CountResponses, ServerMetrics
from pedro.server.schemas import (
    AdapterInfo,
    AdapterList,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    RegisterFromPath,
    Usage,
    new_id,
    now,
)
from pedro.server.tenancy import TenantAdapters
from pedro.server.uploads import BodyLimit, receive_upload

log = logging.getLogger("pedro.server")
T = TypeVar("T")
DISCONNECT_POLL_S = 0.2


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _validation_message(err: Union[RequestValidationError, ValidationError]) -> tuple[str, Optional[str]]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") == "model_attributes_type":
        return "the request body must be a JSON object, sent with Content-Type: application/json", None
    message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    where = ".".join(loc)
    if where:
        return f"{where}: {message}", loc[0]
    # a check across fields (a model validator) has no location: its message starts with the field it is about
    field, sep, _ = message.partition(":")
    return message, (field if sep and field.isidentifier() else None)


def create_app(config: ServerConfig, backend: Backend, keys: KeyRing) -> FastAPI:
    """The app for one backend. Start-up restores the on-disk registry into the engine."""
    registry = AdapterRegistry(config.adapters_dir)
    adapters = TenantAdapters(registry, backend, config)
    metrics = ServerMetrics(backend.stats)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        restored = await adapters.restore()
        if keys.open:
            log.warning(
                "no API keys configured: the server is OPEN (every caller is tenant 'default' with admin rights)"
            )
        log.info("serving %s with %d registered adapter(s)", config.served_model_name, restored)
        yield

    # redirect_slashes off: a path with a stray trailing slash is a 404 (or 405) error body, never a 307 redirect
    # (clients do not re-send a POST body or an Authorization header reliably across redirects)
    app = FastAPI(title="pedro serve", lifespan=lifespan, redirect_slashes=False)
    app.state.backend, app.state.adapters, app.state.metrics = backend, adapters, metrics

    # ---------------------------------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        metrics.rejections.labels(str(err.status)).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return await _api_error(_, APIError(400, message, param=param))

    @app.exception_handler(RequestError)
    async def _refused(_: Request, err: RequestError) -> JSONResponse:
        """The engine's refusal of a request, wherever the server first meets it (building a choice's sampling
        values, encoding, admission): a 4xx naming the field, never a 500."""
        return await _api_error(_, refused(err))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        detail = str(err.detail)
        if err.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI, e.g. bad UTF-8
            detail = "the request body could not be read as JSON text (it must be valid UTF-8 JSON)"
        return await _api_error(_, APIError(err.status_code, detail, headers=err.headers))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        """Anything not turned into an APIError is a bug: logged with its traceback, answered with a generic
        OpenAI-style 500 that names nothing internal."""
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=err)
        return internal_error().response()

    # Request bodies are capped before anything parses them (adapter uploads have their own limit), and every
    # response is counted by status (pedro_http_responses_total), 5xx included: CountResponses is outermost.
    app.add_middleware(
        BodyLimit, max_bytes=config.max_request_bytes, on_refuse=lambda: metrics.rejections.labels("413").inc()
    )
    app.add_middleware(CountResponses, counter=metrics.responses, routes=lambda: app.routes)

    # ---------------------------------------------------------------------------------------- auth

    def principal(request: Request) -> Principal:
        who = keys.resolve(request.headers.get("authorization"))
        if who is None:
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        return who

    def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.admin:
            raise APIError(403, "this endpoint needs an admin key")
        return who

    # ---------------------------------------------------------------------------------------- service

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while every engine (replica) can take requests; 503 ``unavailable`` before they are up and if an
        engine has stopped: what load balancers and orchestration should watch."""
        ready = await backend.ready()
        body = {"status": "ok" if ready else "unavailable", "model": config.served_model_name, **backend.stats()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(_: Principal = Depends(admin)) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def card(who: Principal, record: Optional[AdapterRecord]) -> ModelCard:
        if record is None:
            return ModelCard(id=config.served_model_name, created=0, owned_by="pedro")
        return ModelCard(id=adapters.display_name(who, record), created=record.created, owned_by=record.tenant)

    @app.get("/v1/models")
    async def models(who: Principal = Depends(principal)) -> ModelList:
        return ModelList(data=[card(who, None)] + [card(who, r) for r in adapters.visible(who)])

    @app.get("/v1/models/{model:path}")  # :path: a base model's id may contain '/' (adapter names never do)
    async def model(model: str, who: Principal = Depends(principal)) -> ModelCard:
        """The base model or one of the caller's adapters (the admin: ``tenant:name``); anything else is the same
        404 as for a name that does not exist."""
        return card(who, adapters.resolve(who, model))

    @app.delete("/v1/models/{model:path}")
    async def delete_model(model: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        """``client.models.delete``: a fine-tuned model here is an adapter, so this deletes one of the caller's
        adapters (the admin: ``tenant:name``), as ``DELETE /v1/adapters/{name}`` does."""
        record = await adapters.delete(who, model, param="model")
        return {"id": adapters.display_name(who, record), "object": "model", "deleted": True}

    # ---------------------------------------------------------------------------------------- generation

    def sampling_of(body: Union[CompletionRequest, ChatCompletionRequest], logprobs: Optional[int]) -> SamplingParams:
        max_tokens = body.max_tokens if body.max_tokens is not None else config.default_max_tokens
        if max_tokens > config.max_tokens:
            raise APIError(
                400, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens}", param="max_tokens"
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            stop=tuple(body.stop or ()),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=tuple(body.logit_bias_ids().items()),
            logprobs=logprobs,
        )

    async def generate(
        request: Request,
        who: Principal,
        body: Union[CompletionRequest, ChatCompletionRequest],
        wanted: list[Choice],
        endpoint: str,
        render_chunk: Callable[[str, Choice, RequestOutput], list[str]],
        render_final: Callable[[str, list[tuple[Choice, RequestOutput]]], Any],
    ) -> Any:
        # every choice is one engine request: more than a tenant may ever have at once could never run, and a 429
        # would have well-behaved clients retry it forever
        capacity = config.max_batch + config.max_queued
        most = min(config.max_requests_per_tenant or capacity, capacity)
        if len(wanted) > most:
            several = isinstance(body, CompletionRequest) and len(body.prompts()) > 1
            raise APIError(
                400,
                f"{'prompt: ' if several else 'n: '}this request asks for {len(wanted)} completions "
                f"({'prompts x n' if several else 'n'}); this server runs at most {most} at once for one caller: "
                "split it into smaller requests",
                param="prompt" if several else "n",
            )
        record = adapters.usable(who, body.model)
        adapter = record.engine_name if record else None
        labels = (who.tenant, body.model, endpoint)
        response_id = new_id("cmpl" if endpoint == "completions" else "chatcmpl")

        def observe(out: RequestOutput) -> None:
            metrics.add_tokens(len(out.delta_token_ids))
            if "ttft_s" in out.metrics and len(out.token_ids) == len(out.delta_token_ids):
                metrics.ttft.observe(out.metrics["ttft_s"])
            if out.finished:
                metrics.prompt_tokens.inc(out.prompt_tokens)
                metrics.requests.labels(*labels, out.finish_reason).inc()

        def cancelled(count: int) -> None:
            if count:
                metrics.requests.labels(*labels, "cancelled").inc(count)

        if not body.stream:

            async def run() -> list[tuple[Choice, RequestOutput]]:
                last: dict[int, tuple[Choice, RequestOutput]] = {}
                stream = merged(await open_all(backend, wanted, adapter, who.tenant))
                try:
                    async for choice, out in stream:
                        observe(out)
                        last[choice.index] = (choice, out)
                finally:
                    await stream.aclose()
                return [last[i] for i in sorted(last)]

            try:
                return render_final(response_id, await _unless_disconnected(request, run()))
            except ClientGone:
                cancelled(len(wanted))
                return Response(status_code=499)

        try:
            opened = await _unless_disconnected(request, open_all(backend, wanted, adapter, who.tenant))
        except ClientGone:
            cancelled(len(wanted))
            return Response(status_code=499)

        async def events() -> AsyncIterator[str]:
            finals: dict[int, tuple[Choice, RequestOutput]] = {}
            stream = merged(opened)
            try:
                async for choice, out in stream:
                    observe(out)
                    for chunk in render_chunk(response_id, choice, out):
                        yield f"data: {chunk}\n\n"
                    if out.finished:
                        finals[choice.index] = (choice, out)
                if body.include_usage:
                    yield f"data: {usage_chunk(response_id, [finals[i] for i in sorted(finals)])}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as err:
                # an error found after the 200 went out (an adapter whose logits overflow a few tokens in): an
                # OpenAI error event, then [DONE] so that every client's stream ends as streams do
                yield f"data: {err.body.model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancelled(len(wanted) - len(finals))
                await stream.aclose()

        def usage_chunk(response_id: str, finals: list[tuple[Choice, RequestOutput]]) -> str:
            usage = Usage.of(*usage_counts(finals))
            cls = Completion if endpoint == "completions" else ChatCompletionChunk
            return cls(id=response_id, created=now(), model=body.model, choices=[], usage=usage).model_dump_json()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request, who: Principal = Depends(principal)) -> Any:
        sent: dict[int, int] = {}  # choice index -> characters of its text streamed so far
        held: dict[int, list] = {}  # choice index -> logprobs of tokens whose text is still held back
        offset: dict[int, int] = {}  # choice index -> where the text of its next held token starts

        def chunk(rid: str, choice: Choice, out: RequestOutput) -> list[str]:
            opening = choice.index not in sent
            echo = choice.echo_text(out) if opening else ""
            text = echo + out.delta_text
            held.setdefault(choice.index, []).extend(new_logprobs(out))
            if not text and not out.finished:
                return []
            sent[choice.index] = sent.get(choice.index, 0) + len(text)
            logprobs = None
            if body.logprobs is not None:  # an echoed prompt's logprobs come with its text, in the first chunk
                prompt = (out.prompt_logprobs or ()) if opening else ()
                start = offset.get(choice.index, len(echo))
                ready = streamed(held[choice.index], sent[choice.index] - start, out.finished)
                logprobs = completion_logprobs(ready, start, prompt)
                offset[choice.index] = start + sum(len(e.text) for e in ready)
            piece = CompletionChoice(
                index=choice.index,
                text=text,
                finish_reason=out.finish_reason if out.finished else None,
                logprobs=logprobs,
            )
            return [Completion(id=rid, created=now(), model=body.model, choices=[piece]).model_dump_json()]

        def final(rid: str, finals: list[tuple[Choice, RequestOutput]]) -> Completion:
            pieces = []
            for choice, out in finals:
                echo = choice.echo_text(out)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(out.logprobs or [], len(echo), out.prompt_logprobs or ())
                pieces.append(
                    CompletionChoice(
                        index=choice.index, text=echo + out.text, finish_reason=out.finish_reason, logprobs=logprobs
                    )
                )
            return Completion(
                id=rid, created=now(), model=body.model, choices=pieces, usage=Usage.of(*usage_counts(finals))
            )

        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens: 0 is only allowed with echo (the prompt, and with logprobs its logprobs, "
                "without a completion)",
                param="max_tokens",
            )
        wanted = choices(
            body.prompts(), body.n, sampling_of(body, body.logprobs), echo=body.echo, raw_prompt=body.raw_prompt
        )
        return await generate(request, who, body, wanted, "completions", chunk, final)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, who: Principal = Depends(principal)
    ) -> Any:
        opened: set[int] = set()
        held: dict[int, list] = {}  # choice index -> logprobs of tokens whose text is still held back
        room: dict[int, int] = {}  # choice index -> characters streamed beyond the text of the logprobs sent
        logprobs = (body.top_logprobs or 0) if body.logprobs else None

        def chunk(rid: str, choice: Choice, out: RequestOutput) -> list[str]:
            pieces = []
            if choice.index not in opened:
                opened.add(choice.index)
                pieces.append(ChunkChoice(index=choice.index, delta=Delta(role="assistant", content="")))
            held.setdefault(choice.index, []).extend(new_logprobs(out))
            if out.delta_text or (out.finished and held[choice.index]):
                space = room.get(choice.index, 0) + len(out.delta_text)
                entries = streamed(held[choice.index], space, out.finished)
                room[choice.index] = space - sum(len(e.text) for e in entries)
                pieces.append(
                    ChunkChoice(
                        index=choice.index,
                        delta=Delta(content=out.delta_text),
                        logprobs=chat_logprobs(entries) if logprobs is not None else None,
                    )
                )
            if out.finished:
                pieces.append(ChunkChoice(index=choice.index, delta=Delta(), finish_reason=out.finish_reason))
            return [
                ChatCompletionChunk(id=rid, created=now(), model=body.model, choices=[p]).model_dump_json()
                for p in pieces
            ]

        def final(rid: str, finals: list[tuple[Choice, RequestOutput]]) -> ChatCompletion:
            pieces = [
                ChatChoice(
                    index=choice.index,
                    message=AssistantMessage(content=out.text),
                    finish_reason=out.finish_reason,
                    logprobs=chat_logprobs(out.logprobs or []) if logprobs is not None else None,
                )
                for choice, out in finals
            ]
            return ChatCompletion(
                id=rid, created=now(), model=body.model, choices=pieces, usage=Usage.of(*usage_counts(finals))
            )

        messages = [m.as_dict() for m in body.messages]
        wanted = choices([messages], body.n, sampling_of(body, logprobs))
        return await generate(request, who, body, wanted, "chat.completions", chunk, final)

    # ---------------------------------------------------------------------------------------- adapters

    def info(who: Principal, record: AdapterRecord) -> AdapterInfo:
        return AdapterInfo(
            id=adapters.display_name(who, record),
            name=record.name,
            tenant=record.tenant,
            kind=record.kind,
            parameters=record.parameters,
            bytes=record.bytes,
            created=record.created,
        )

    @app.get("/v1/adapters")
    async def list_adapters(who: Principal = Depends(principal)) -> AdapterList:
        return AdapterList(data=[info(who, r) for r in adapters.visible(who)])

    @app.post("/v1/adapters", status_code=201)
    async def register_adapter(request: Request, who: Principal = Depends(principal)) -> AdapterInfo:
        content_type = request.headers.get("content-type", "")
        staged = registry.new_staging()
        try:
            if content_type.startswith("multipart/form-data"):
                fields = await receive_upload(request, staged, config.max_upload_bytes)
                name, tenant = fields.get("name"), fields.get("tenant")
            elif content_type.startswith("application/json"):
                try:
                    body = RegisterFromPath.model_validate_json(await request.body())
                except ValidationError as err:
                    raise APIError(400, *_validation_message(err)) from None
                adapters.stage_from_path(who, body.path, staged)
                name, tenant = body.name, body.tenant
            else:
                raise APIError(400, "send multipart/form-data (upload) or application/json {name, path} (admin)")
            record = await adapters.register(who, name, tenant, staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return info(who, record)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        record = await adapters.delete(who, name)
        return {"id": adapters.display_name(who, record), "object": "adapter", "deleted": True}

    return app
