"""Request bodies within byte budgets: adapter uploads (multipart/form-data) into a staging directory, and
every other body (JSON) through the BodyLimit middleware.

An upload is counted as it arrives and cut off with 413 the moment it passes ``max_upload_bytes``, so an
oversized or endless upload costs at most that much disk and never reaches the store. Only the two PEFT file
names are accepted as file parts; anything else (a pickle ``adapter_model.bin``, ``../x``) is refused by name
before its content is looked at. Any other request body is held to ``max_request_bytes`` before the app reads
it, so no JSON parser ever sees an oversized body.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import AsyncGenerator, Callable, Optional

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pedro.server.errors import APIError
from pedro.server.validate import ADAPTER_FILES

FORM_FIELDS = ("name", "tenant")


async def _limited(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise APIError(413, f"the upload is larger than the limit of {max_bytes} bytes", code="upload_too_large")
        yield chunk


async def receive_upload(request: Request, staging: Path, max_bytes: int) -> dict[str, str]:
    """Write the uploaded adapter files into ``staging``; -> the form's text fields (``name``, ``tenant``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the upload is {declared} bytes; the limit is {max_bytes}", code="upload_too_large")
    parser = MultiPartParser(
        request.headers, _limited(request, max_bytes), max_files=len(ADAPTER_FILES), max_fields=len(FORM_FIELDS)
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if err.message.startswith("Too many files"):  # the parser stops at the limit, before naming the others
            raise APIError(
                400,
                f"too many files: upload exactly {list(ADAPTER_FILES)} (other files a save writes beside them, "
                "such as README.md, are not part of the adapter)",
                param="files",
            ) from None
        if err.message.startswith("Too many fields"):
            raise APIError(400, f"too many form fields: the form takes {list(FORM_FIELDS)} and the two files") from None
        raise APIError(400, f"malformed multipart upload: {err.message}") from None
    fields: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key not in FORM_FIELDS:
                    raise APIError(400, f"unknown form field {key!r}; expected {list(FORM_FIELDS)} and the two files")
                if key in fields:
                    raise APIError(400, f"form field {key!r} given twice", param=key)
                fields[key] = value
                continue
            if value.filename not in ADAPTER_FILES:
                raise APIError(
                    400,
                    f"file {value.filename!r} refused: upload exactly {list(ADAPTER_FILES)} "
                    "(safetensors only; pickle checkpoints such as .bin / .pt are never loaded)",
                    param="files",
                )
            target = staging / value.filename
            if target.exists():
                raise APIError(400, f"file {value.filename!r} uploaded twice", param="files")
            with target.open("wb") as out:
                shutil.copyfileobj(value.file, out)
    finally:
        await form.close()
    missing = [name for name in ADAPTER_FILES if not (staging / name).is_file()]
    if missing:
        raise APIError(400, f"the upload lacks {missing}", param="files")
    return fields


# ------------------------------------------------------------------------------------------------ other bodies


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def is_adapter_upload(scope: Scope) -> bool:
    """POST /v1/adapters as multipart/form-data: receive_upload applies ``max_upload_bytes`` to it instead."""
    content_type = (_header(scope, b"content-type") or "").lower()
    return (
        scope.get("method") == "POST"
        and scope.get("path") == "/v1/adapters"
        and content_type.startswith("multipart/form-data")
    )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 (``code: request_too_large``) before the app
    reads any of it -- from ``Content-Length`` when the client sends one, otherwise by counting the body as it
    arrives (chunked transfer). A body within the limit is handed to the app unchanged. Requests for which
    ``exempt(scope)`` holds pass through untouched. ``on_refuse()`` is called for every 413 (metrics)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        exempt: Callable[[Scope], bool] = is_adapter_upload,
        on_refuse: Callable[[], None] = lambda: None,
    ) -> None:
        self.app, self.max_bytes, self.exempt, self.on_refuse = app, max_bytes, exempt, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(
                scope, receive, send, f"the request body is {int(declared)} bytes; the limit is {self.max_bytes}"
            )
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client is gone, nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(
                    scope, receive, send, f"the request body is larger than the limit of {self.max_bytes} bytes"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        self.on_refuse()
        error = APIError(413, message, code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)
