"""Checks an adapter directory completely before the server stores or serves it.

An uploaded adapter is untrusted input. Before it is moved into the store it must be: exactly the two PEFT files
(safetensors, never a pickle), a JSON config of a kind the engine serves that PEFT / PedroConfig parse without
complaint, a safetensors file that opens, holds every tensor its header promises (not truncated) with finite
floating-point values, and tensors whose names and shapes fit the loaded backbone (the engine's own planner
decides that -- Engine.check_adapter, a dry run of add_adapter -- so the server can never accept an adapter the
engine would refuse later).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pedro.engine import AdapterError
from pedro.io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
SERVED_TYPES = ("PEDRO", "LORA", "IA3")
MAX_CONFIG_BYTES = 64 * 1024


class InvalidAdapter(ValueError):
    """The adapter is refused; the message says which check failed."""


def check_adapter(directory: Path, fits: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """-> ``{"kind", "parameters", "bytes"}`` for a directory holding exactly the two adapter files, or
    InvalidAdapter. ``fits`` is the engine's dry run (Engine.check_adapter). Reads only, never writes."""
    present = sorted(p.name for p in directory.iterdir())
    if present != sorted(ADAPTER_FILES):
        raise InvalidAdapter(f"an adapter is exactly {list(ADAPTER_FILES)}; got {present}")
    config_path = directory / CONFIG_NAME
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapter(f"{CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_NAME} must be a JSON object")
    if config.get("peft_type") not in SERVED_TYPES:
        raise InvalidAdapter(f"{CONFIG_NAME} peft_type must be one of {list(SERVED_TYPES)}, got {config.get('peft_type')!r}")
    try:
        fit = fits(directory)
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (AdapterError, AdapterFileError, SafetensorError) as err:
        raise InvalidAdapter(str(err)) from None
    except (TypeError, ValueError, KeyError) as err:  # PEFT / PedroConfig refusing a field of the config
        raise InvalidAdapter(f"{CONFIG_NAME} is not a valid {config['peft_type']} config: {err}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidAdapter(f"adapter tensor {key} has dtype {tensor.dtype}; adapters hold floating-point weights")
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"adapter tensor {key} holds NaN or infinite values")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {**fit, "bytes": size}
