"""Pydantic models of the OpenAI wire format this server speaks (requests, responses, stream chunks, errors).

Requests are parsed strictly (``"5"`` is not a number) so a client bug shows up as a 400 naming the field, not
as a silently coerced value. Every number is bounded (a seed beyond 64 bits, a ``top_k`` of 10**30, ...) and
non-finite floats (the ``NaN`` / ``Infinity`` tokens Python's json module writes) are refused, so nothing a
client sends can overflow later in the engine. Fields this server does not know are ignored, as
OpenAI-compatible servers commonly do, so newer clients that send extra options keep working; options that
would change the *meaning* of the answer and that we cannot honour (tools, JSON mode, ``best_of``, ...) are
refused with a 400 naming them instead of silently dropped (REFUSED; docs/server.md lists every field).
"""

from __future__ import annotations

import difflib
import time
import uuid
from typing import Any, Literal, Optional, Union, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

# field -> why it is refused, when a request sets it to anything but an "off" value (None, False, 0, "", [], {})
REFUSED = {
    "suffix": "insertion (fill-in-the-middle) is not supported",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "verbosity": "verbosity control is not supported",
    "reasoning_effort": "the backbone is not a reasoning model",
}
# field -> (values that change nothing, why anything else is refused)
REFUSED_UNLESS = {
    "best_of": ((None, 1), "best_of > 1 is not supported: use n and rank the choices yourself"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "response_format": (
        (None, {"type": "text"}),
        "JSON mode / structured outputs are not supported (no constrained decoding)",
    ),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prompt_logprobs": (
        (None,),
        "the vLLM extension is not supported: on /v1/completions, echo with logprobs returns the prompt's logprobs",
    ),
}
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20
MAX_INT32 = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # signed 64-bit: what torch.Generator.manual_seed (the engine) takes
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# Request fields of OpenAI's API this server reads no meaning from and ignores; any other unknown field that is one
# typo away from a field it does read (max_token, temprature) is refused, since ignoring it would silently change
# the answer the caller asked for.
IGNORED_OPENAI_FIELDS = frozenset(
    {
        "metadata", "store", "service_tier", "parallel_tool_calls", "modalities", "audio", "prediction",
        "reasoning_effort", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
    }
)  # fmt: skip


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(
        None, ge=1, le=MAX_INT32, description="The server's max_tokens limit also applies."
    )
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1, description="0 keeps only the most likely token, as OpenAI allows.")
    top_k: int = Field(0, ge=0, le=MAX_INT32, description="Extension: 0 = off; beyond the vocabulary = off.")
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): generate exactly max_tokens; for benchmarks.")
    stop: Optional[Union[str, list[str]]] = Field(None, validate_default=True)
    seed: Optional[int] = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Choice i of n samples with seed + i (wrapping around the signed 64-bit range).",
    )
    n: int = Field(1, ge=1, le=MAX_N, description="Independent samples per prompt (their prompt is prefilled once).")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="Extension (as in vLLM): 1 = off.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit null on a field that has a default means that default, as OpenAI reads it: the official
        clients send null for every argument the caller passed as None."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in REFUSED.items():
                if data.get(key) not in (None, False, 0, "", [], {}):
                    raise ValueError(f"{key}: {why}")
            for key, (allowed, why) in REFUSED_UNLESS.items():
                if key in data and data[key] not in allowed:
                    raise ValueError(f"{key}: {why}")
            if data.get("stream_options") is not None and not data.get("stream"):
                raise ValueError("stream_options: only allowed when stream is true")
            known = [*cls.model_fields, *REFUSED, *REFUSED_UNLESS]
            for key in data:
                if isinstance(key, str) and key not in known and key not in IGNORED_OPENAI_FIELDS:
                    close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
                    if close and abs(len(key) - len(close[0])) <= 2:  # a slip, not a new option (top_p_v2)
                        raise ValueError(f"{key}: not a field of this request; did you mean {close[0]!r}?")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for token, value in (bias or {}).items():
            if not (token.isascii() and token.isdigit()) or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids (strings of digits) to numbers in [-100, 100]")
        return bias

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(token): value for token, value in (self.logit_bias or {}).items()}

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
    """``POST /v1/completions``: a raw text prompt (no chat template) or token ids, or a list of either (a
    batch: choice index = prompt index * n + sample index, as OpenAI numbers them). ``echo`` with ``logprobs``
    scores the prompt too, and ``max_tokens`` 0 with ``echo`` scores it without a completion: what
    lm-evaluation-harness's loglikelihood requests send (vLLM allows 0 only with echo, and so does this server)."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_INT32,
        description="The server's max_tokens limit also applies; 0 only with echo (score the prompt).",
    )
    logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (0: the chosen token's only)."
    )
    echo: bool = Field(
        False,
        description="Prepend the prompt (token ids: decoded) to each choice's text; with logprobs, its tokens' logprobs too.",
    )
    raw_prompt: Optional[bool] = Field(
        None,
        description="Extension: how a text prompt is encoded. Default: as the adapter's training encoded its "
        "prompts (recorded by pedro train; raw for the base model and adapters without a record); true: as-is; "
        "false: through the chat template.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, (str, list)) and not p for p in prompt)):
            raise ValueError("the prompt, and each prompt of a batch, must be non-empty")
        return prompt

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch: one prompt, or each element of a list of strings / of token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return cast(list[Union[str, list[int]]], list(self.prompt))  # a list of strings or of token-id lists


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(BaseModel):
    """One message. The chat template renders a message as its role and its text and nothing else, so what it
    cannot carry is refused by name rather than dropped: a participant's ``name``, tool results (role ``tool`` /
    ``function``, with their ``tool_call_id``) and an assistant's ``tool_calls`` / ``function_call`` (this server does no tool calling:
    ``tools`` is refused, so no tool call of its own can be answered). An assistant message with ``content``
    null or absent is an empty assistant turn; any other role needs content."""

    model_config = STRICT

    role: str
    content: Optional[Union[str, list[TextPart]]] = Field(None, validate_default=True)
    tool_calls: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    name: Optional[str] = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise ValueError(
                f"role {role!r} (a tool result) is not supported: this server does no tool calling (tools is "
                "refused) and renders messages as role + text only; send the result as a user message"
            )
        if role not in CHAT_ROLES:
            raise ValueError("role must be 'system', 'developer', 'user' or 'assistant'")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported: this server takes text only")
        return content

    @field_validator("content")
    @classmethod
    def _content(
        cls, content: Optional[Union[str, list[TextPart]]], info: ValidationInfo
    ) -> Optional[Union[str, list[TextPart]]]:
        if content is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only an assistant message may have null or no content")
        return content

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, calls: Any, info: ValidationInfo) -> Any:
        if calls:
            raise ValueError(
                f"an assistant's {info.field_name} cannot be rendered: this server does no tool calling (tools is refused)"
            )
        return calls

    @field_validator("name")
    @classmethod
    def _no_name(cls, name: Optional[str]) -> Optional[str]:
        if name:
            raise ValueError(
                "a participant's name cannot be rendered: the chat template carries a message's role and text "
                "only; put the name in the content"
            )
        return name

    def as_dict(self) -> dict[str, str]:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages, formatted with the backbone's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        return self

    @model_validator(mode="after")
    def _alias(self) -> "ChatCompletionRequest":
        """``max_completion_tokens`` is OpenAI's current name for ``max_tokens`` (deprecated there): either may
        be sent, or both with the same value; two different limits are refused rather than one silently
        dropped."""
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError(
                    f"max_completion_tokens: {self.max_completion_tokens} differs from max_tokens "
                    f"{self.max_tokens}; send one of them"
                )
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
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Optional[Literal["stop", "length"]]


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token (an echoed prompt's tokens first;
    its first token's logprob and top_logprobs are null, as nothing predicts it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    """A completion, or (``usage`` None until the end) one streamed chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """A streamed message's change: only the fields it carries are sent (OpenAI sends the role once, then only
    content, and an empty delta with the finish reason), since strict clients read a present ``null`` as a value."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _carried(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason = None
    logprobs: Optional[ChatLogprobs] = None


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
