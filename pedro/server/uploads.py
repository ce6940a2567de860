"""Receiving an adapter upload (multipart/form-data) into a staging directory, within a byte budget.

The body is counted as it arrives and the upload is cut off with 413 the moment it passes the limit, so an
oversized or endless upload costs at most ``max_bytes`` of disk and never reaches the store. Only the two PEFT
file names are accepted as file parts; anything else (a pickle ``adapter_model.bin``, ``../x``) is refused by
name before its content is looked at.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import AsyncIterator

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from pedro.server.errors import APIError
from pedro.server.validate import ADAPTER_FILES

FORM_FIELDS = ("name", "tenant")


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
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
    parser = MultiPartParser(request.headers, _limited(request, max_bytes), max_files=len(ADAPTER_FILES), max_fields=len(FORM_FIELDS))
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise APIError(400, f"malformed multipart upload: {err.message}") from None
    fields: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key not in FORM_FIELDS:
                    raise APIError(400, f"unknown form field {key!r}; expected {list(FORM_FIELDS)} and the two files")
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
