"""What a caller hands the engine (Request, SamplingParams) and what it gets back (RequestOutput).

Validation lives here, at construction, so a bad request is refused with a message naming the field before it
can take a slot in the running batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class RequestError(ValueError):
    """A request the engine refuses (bad sampling values, unknown adapter, prompt too long, ...).

    Raised for that request only: the rest of the batch is not affected. ``field``: the SamplingParams field at
    fault, when one is, so that a server can name it to its client.
    """

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class QueueFull(RequestError):
    """The engine's waiting queue is at ``max_waiting``, or the request's tenant has ``max_per_tenant``
    requests running or waiting: try again once running requests finish."""


class TenantLimit(QueueFull):
    """The request's tenant already has ``max_per_tenant`` requests running or waiting: that tenant alone waits
    for its own requests to finish; the engine may have room for others."""


class PromptTooLong(RequestError):
    """The prompt does not fit the context (or the caller's token limit)."""


# Why a request finished with ``finish_reason == "error"`` (RequestOutput.error_code). The first three fail
# that request alone, the rest of the batch is unaffected: its adapter could not be loaded, its logits were not
# finite (an adapter that overflows), or its prefill raised on its own. ENGINE_FAILURE: the engine hit a bug
# during a step, failed every request it held and rebuilt its state.
ADAPTER_LOAD_FAILED = "adapter_load_failed"
NUMERIC_OVERFLOW = "numeric_overflow"
REQUEST_FAILED = "request_failed"
ENGINE_FAILURE = "engine_failure"

# Temperatures below this sample as greedy: dividing logits by a smaller one overflows to inf (vLLM uses the
# same threshold).
GREEDY_BELOW = 1e-5
# Signed 64-bit: the range torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2**63), 2**63 - 1)


def _refuse(name: str, allowed: str, got: Any) -> None:
    raise RequestError(f"SamplingParams.{name} must be {allowed}, got {got!r}", field=name)


def nth_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of a seeded request: ``seed + k``, wrapped around the signed 64-bit range (as
    int64 arithmetic would), so that every seed a request may carry gives valid seeds to all its samples."""
    low, high = SEED_RANGE
    return (seed + k - low) % (high - low + 1) + low


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature`` 0 (or below 1e-5) is greedy (top_k / top_p are then ignored).

    Logit adjustments, in this order, before temperature: ``logit_bias`` (token id -> added value, as OpenAI),
    ``repetition_penalty`` (vLLM / transformers semantics: every token of the prompt and output so far has its
    logit divided by it when positive, multiplied when negative; 1 = off), ``frequency_penalty`` and
    ``presence_penalty`` (OpenAI semantics over the generated tokens: ``count * frequency + (count > 0) *
    presence`` is subtracted). ``logprobs``: None = off; k >= 0 = report each chosen token's log-probability
    and the k most likely alternatives, under the model's own distribution (log-softmax of the raw logits,
    before any adjustment: what vLLM reports by default). ``prompt_logprobs``: the same for every prompt token
    after the first, each under the distribution the prefill computed from the tokens before it (what scoring a
    text needs, e.g. lm-evaluation-harness's loglikelihood); only a request that asks pays for the
    full-vocabulary log-softmax at its prompt positions. ``max_new_tokens`` 0 generates nothing: the prompt is
    prefilled (for its prompt logprobs) and the request finishes with "length". ``return_prompt_text``: decode
    the prompt's token ids into ``RequestOutput.prompt_text`` (what completions' ``echo`` shows for a token-id
    prompt).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_prompt_text: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            _refuse("max_new_tokens", "an integer >= 0 (0: prefill only)", self.max_new_tokens)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            _refuse("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            _refuse("top_k", "an integer >= 0 (0 = off)", self.top_k)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 <= self.top_p <= 1:
            _refuse("top_p", "a number in [0, 1] (0: the most likely token only)", self.top_p)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            _refuse("stop", "a list of non-empty strings", self.stop)
        object.__setattr__(self, "stop", stop)
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            _refuse("seed", "None or a signed 64-bit integer", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            if not _number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                _refuse(name, "a number in [-2, 2]", getattr(self, name))
        if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            _refuse("repetition_penalty", "a number in (0, 100] (1 = off)", self.repetition_penalty)
        bias = tuple(sorted((self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias) or ()))
        if any(
            len(pair) != 2
            or isinstance(pair[0], bool)
            or not isinstance(pair[0], int)
            or pair[0] < 0
            or not _number(pair[1])
            or not -100 <= pair[1] <= 100
            for pair in bias
        ):
            _refuse("logit_bias", "a mapping of token ids >= 0 to numbers in [-100, 100]", self.logit_bias)
        object.__setattr__(self, "logit_bias", bias)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS
            ):
                _refuse(name, f"None or an integer in [0, {MAX_LOGPROBS}]", value)
        if not isinstance(self.return_prompt_text, bool):
            _refuse("return_prompt_text", "True or False", self.return_prompt_text)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


Messages = list[dict[str, str]]
_ids = itertools.count()


@dataclass
class Request:
    """One generation: a prompt (text, chat messages, or token ids), an optional adapter name, sampling.

    A text prompt gets the backbone's chat template (as ``pedro generate`` does) unless ``raw_prompt``;
    messages always do; token ids are used as they are. ``tenant`` is the fairness key: waiting requests are
    admitted round-robin over tenants, so one tenant's flood cannot delay another's admission.
    """

    prompt: Union[str, Messages, list[int]]
    adapter: Optional[str] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    raw_prompt: bool = False
    tenant: Optional[str] = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``SamplingParams.logprobs`` (for a prompt token: ``prompt_logprobs``)
    most likely alternatives (token id, log-probability), most likely first; ``text`` / ``top_text``: the text
    each token adds after the tokens before it (empty without a tokenizer). ``logprob`` is None only for a
    prompt's first token, which nothing before it predicts."""

    token: int
    logprob: Optional[float]
    top: tuple[tuple[int, float], ...] = ()
    text: str = ""
    top_text: tuple[str, ...] = ()
    raw: Optional[bytes] = None  # the token's own bytes where they are not text by themselves (part of a character)
    top_raw: tuple[Optional[bytes], ...] = ()

    def alternatives(self) -> list[tuple[str, Optional[bytes], float]]:
        """(text, raw, logprob) of each alternative that has its text, most likely first."""
        raws = self.top_raw or (None,) * len(self.top)
        return [(text, raw, value) for text, raw, (_, value) in zip(self.top_text, raws, self.top)]


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    ``token_ids`` / ``text`` are everything generated so far; ``delta_token_ids`` / ``delta_text`` what this
    step added (text is held back while it could still turn into a stop string; a request added without
    ``track_text`` is decoded once, when it finishes, so its last ``delta_text`` is the whole text). ``finish_reason`` is
    ``"stop"`` (EOS or a stop string), ``"length"``, ``"abort"`` or ``"error"`` (then ``error`` says why and
    ``error_code`` is one of ADAPTER_LOAD_FAILED, NUMERIC_OVERFLOW, REQUEST_FAILED, ENGINE_FAILURE). ``metrics``:
    ``ttft_s``, ``latency_s`` and ``queued_steps`` (engine steps between queueing and admission). ``logprobs``:
    one TokenLogprob per token of ``token_ids`` when the request asked for them, else None.
    ``prompt_logprobs``: one TokenLogprob per prompt token (the first with logprob None) when the request asked
    for them (``SamplingParams.prompt_logprobs``), ``prompt_text`` the prompt's ids decoded when it asked
    (``return_prompt_text``); both are there from the request's first output on.
    """

    request_id: str
    adapter: Optional[str]
    prompt_tokens: int
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    error_code: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    logprobs: Optional[list[TokenLogprob]] = None
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    prompt_text: Optional[str] = None
