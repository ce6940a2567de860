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

    Raised for that request only: the rest of the batch is not affected.
    """


class QueueFull(RequestError):
    """The engine's waiting queue is at ``max_waiting``: try again once running requests finish."""


def _refuse(name: str, allowed: str, got: Any) -> None:
    raise RequestError(f"SamplingParams.{name} must be {allowed}, got {got!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy (top_k / top_p are then ignored)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            _refuse("max_new_tokens", "a positive integer", self.max_new_tokens)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            _refuse("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            _refuse("top_k", "an integer >= 0 (0 = off)", self.top_k)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            _refuse("top_p", "a number in (0, 1]", self.top_p)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            _refuse("stop", "a list of non-empty strings", self.stop)
        object.__setattr__(self, "stop", stop)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            _refuse("seed", "None or an integer", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


Messages = list[dict[str, str]]
_ids = itertools.count()


@dataclass
class Request:
    """One generation: a prompt (text, chat messages, or token ids), an optional adapter name, sampling.

    A text prompt gets the backbone's chat template (as ``pedro generate`` does) unless ``raw_prompt``;
    messages always do; token ids are used as they are.
    """

    prompt: Union[str, Messages, list[int]]
    adapter: Optional[str] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    raw_prompt: bool = False
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    ``token_ids`` / ``text`` are everything generated so far; ``delta_token_ids`` / ``delta_text`` what this
    step added (text is held back while it could still turn into a stop string). ``finish_reason`` is
    ``"stop"`` (EOS or a stop string), ``"length"``, ``"abort"`` or ``"error"`` (then ``error`` says why).
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
    metrics: dict[str, float] = field(default_factory=dict)
