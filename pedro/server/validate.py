"""Checks an adapter directory completely before the server stores or serves it.

An uploaded adapter is untrusted input. Before it is moved into the store it must be: exactly the two PEFT files;
what ``pedro.engine.adapter_config.read_adapter_files`` accepts, the reading the engine itself does (a config of
peft_type PEDRO / LORA / IA3 parsed by PEFT's / PedroConfig's own classes, no unknown field, only features the
engine serves; safetensors, never a pickle, whose header lists only float32 / float16 / bfloat16 / float64
tensors, checked before any value is read); a weights file that holds every tensor its header promises (not
truncated) with finite values; and tensors whose names and shapes fit the loaded backbone (the engine's own
planner decides that -- Engine.check_adapter, a dry run of add_adapter -- so the server can never accept an
adapter the engine would refuse later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pedro.engine import AdapterError
from pedro.engine.adapter_config import CLASSES, SERVED_DTYPES, AdapterConfigError, read_adapter_files
from pedro.io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
SERVED_TYPES = tuple(CLASSES)
MAX_CONFIG_BYTES = 64 * 1024
_TORCH_DTYPES = tuple(getattr(torch, name) for name in SERVED_DTYPES.values())


class InvalidAdapter(ValueError):
    """The adapter is refused; the message says which check failed."""


def check_adapter(directory: Path, fits: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """-> ``{"kind", "parameters", "bytes"}`` for a directory holding exactly the two adapter files, or
    InvalidAdapter. ``fits`` is the engine's dry run (Engine.check_adapter). Reads only, never writes."""
    present = sorted(p.name for p in directory.iterdir())
    if present != sorted(ADAPTER_FILES):
        raise InvalidAdapter(f"an adapter is exactly {list(ADAPTER_FILES)}; got {present}")
    try:
        read_adapter_files(directory, max_config_bytes=MAX_CONFIG_BYTES)
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (AdapterConfigError, AdapterFileError) as err:
        raise InvalidAdapter(str(err)) from None
    except SafetensorError as err:
        raise InvalidAdapter(f"{WEIGHTS_NAME} is not a valid safetensors file (corrupt or truncated): {err}") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in _TORCH_DTYPES:  # the header said otherwise: never trust one check alone
            raise InvalidAdapter(
                f"adapter tensor {key} has dtype {tensor.dtype}; adapters hold {', '.join(SERVED_DTYPES.values())} weights"
            )
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"adapter tensor {key} holds NaN or infinite values")
    try:
        fit = fits(directory)  # the engine's planner: names and shapes against the backbone, and loading the weights
    except (AdapterError, AdapterFileError, SafetensorError) as err:
        raise InvalidAdapter(str(err)) from None
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, MemoryError) as err:
        raise InvalidAdapter(f"the engine cannot load this adapter: {err}") from None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {**fit, "bytes": size}
