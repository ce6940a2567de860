"""Where the engine's tensors live, and how per-step inputs get there.

Everything the model reads -- weights, KV cache, per-row scale tables, LoRA stacks, PEDRO generators, a step's
token / position / index tensors -- is on the model's device; host data (Python lists of token ids, slots,
lengths: the scheduler's bookkeeping) is turned into tensors there once per step by ``upload``. On CUDA the
copy goes through pinned memory without blocking, so the host can queue the step's kernels while the copy
runs; a copy from pageable memory would wait for the device to drain first.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

DeviceLike = Union[str, torch.device]


def canonical(device: DeviceLike) -> torch.device:
    """``device`` with an index where the device type has one (``cuda`` -> ``cuda:<current>``), so two names of
    one device compare equal; a device this machine does not have is a ValueError saying so, not torch's
    assertion from deep inside the first allocation."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {str(device)!r} is not a device name (cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} asked for, but {why}; use device cpu")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible"
            )
    return device


def upload(
    values: Union[Sequence[int], Sequence[float], torch.Tensor], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """A host list (or host tensor) as a tensor on ``device``: pinned and non-blocking on CUDA."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
