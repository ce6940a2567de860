"""pedro.engine: multi-tenant batched inference, one frozen backbone, many PEDRO / LoRA / (IA)3 adapters."""

from pedro.engine.adapters import AdapterError, UnknownAdapter
from pedro.engine.async_engine import AsyncEngine, EngineDead
from pedro.engine.engine import Engine
from pedro.engine.request import (
    ADAPTER_LOAD_FAILED,
    ENGINE_FAILURE,
    NUMERIC_OVERFLOW,
    REQUEST_FAILED,
    PromptTooLong,
    QueueFull,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    TenantLimit,
    TokenLogprob,
    nth_seed,
)

__all__ = [
    "ADAPTER_LOAD_FAILED",
    "ENGINE_FAILURE",
    "NUMERIC_OVERFLOW",
    "REQUEST_FAILED",
    "AdapterError",
    "AsyncEngine",
    "Engine",
    "EngineDead",
    "PromptTooLong",
    "QueueFull",
    "Request",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "TenantLimit",
    "TokenLogprob",
    "UnknownAdapter",
    "nth_seed",
]
