"""Pydantic models of the OpenAI wire format this server speaks (requests, responses, stream chunks, errors).

Requests are parsed strictly (``"5"`` is not a number) so a client bug shows up as a 400 naming the field, not
as a silently coerced value. Every number is bounded (a seed beyond 64 bits, a ``top_k`` of 10**30, ...) and
non-finite floats (the ``NaN`` / ``Infinity`` tokens Python's json module writes) are refused, so nothing a
client sends can overflow later in the engine. Fields this server does not know are ignored, as
OpenAI-compatible servers commonly do, so newer clients that send extra options keep working; options that
would change the *meaning* of the answer and that we cannot honour (logprobs, echo, tools, ...) are refused
instead of silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
MAX_INT32 = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # signed 64-bit: what torch.Generator.manual_seed (the engine) takes
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_INT32, description="The server's max_tokens limit also applies.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_INT32, description="Extension: 0 = off; beyond the vocabulary = off.")
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): generate exactly max_tokens; for benchmarks.")
    stop: Optional[Union[str, list[str]]] = Field(None, validate_default=True)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            used = [key for key in UNSUPPORTED if data.get(key) not in (None, False, 0, [], {})]
            if used:
                raise ValueError(f"{used} not supported by this server")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Optional[Union[str, list[str]]]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw text prompt (no chat template), or token ids."""

    prompt: Union[str, list[int]]


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages, formatted with the backbone's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_INT32)

    @model_validator(mode="after")
    def _alias(self) -> "ChatCompletionRequest":
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


# ------------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


FinishReason = Optional[Literal["stop", "length"]]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or (``usage`` None until the end) one streamed chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------ adapters


class RegisterFromPath(BaseModel):
    """``POST /v1/adapters`` as JSON: register an adapter directory that is already on the server (admin only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    path: str
    tenant: Optional[str] = None


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    tenant: str
    kind: str
    parameters: int
    bytes: int
    created: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
