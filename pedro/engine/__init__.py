"""pedro.engine: multi-tenant batched inference, one frozen backbone, many PEDRO / LoRA / (IA)3 adapters."""

from pedro.engine.adapters import AdapterError
from pedro.engine.async_engine import AsyncEngine
from pedro.engine.engine import Engine
from pedro.engine.request import QueueFull, Request, RequestError, RequestOutput, SamplingParams

__all__ = ["AdapterError", "AsyncEngine", "Engine", "QueueFull", "Request", "RequestError", "RequestOutput", "SamplingParams"]
