"""The engine's own CPU kernel, built from source on first use: bf16 decode attention (kernels/decode_attention.cpp).

Why a kernel of our own: at one query per row, the flash kernel behind ``scaled_dot_product_attention`` spends
more time blocking than reading the cache -- a batch-32 SmolLM2 layer (3 KV heads of 3 queries, ~160 keys)
took 1.04 ms there against 0.48 ms in this kernel (1 thread, the 30 layers' caches in memory), a third of a
bf16 decode step. It is also the more exact of the two: its probabilities stay in fp32, where the flash kernel
rounds them to bf16. On x86 CPUs with AVX512-BF16 its scores use the CPU's bf16 dot products; elsewhere
plain loops the compiler vectorises.

It is compiled by ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions) the first time a bf16 engine starts on a CPU,
~10-30 s, and loaded from there afterwards. Where it cannot be built, the engine attends with SDPA and says so
once in its log.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("pedro.engine")

SOURCE = Path(__file__).parent / "kernels" / "decode_attention.cpp"
HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 16  # query heads per KV head

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


@functools.cache
def decode_attention(portable: bool = False) -> Optional[DecodeAttention]:
    """``op(q, k, v, lengths, window, scale) -> out``, or None where the kernel cannot be built here.

    q: (B, kv_heads, group, head_dim) bf16; k, v: one layer's cache (slots, kv_heads, S, head_dim); lengths:
    (B,) int64, row b's newest key position; window: attend the last ``window`` keys (0: all).
    ``portable``: the plain loops even where the CPU has bf16 dot products (what other CPUs run: its test)."""
    namespace = "pedro_portable" if portable else "pedro"
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # pip's ninja, in an environment whose bin folder is not on PATH
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])

        load(
            name=f"{namespace}_decode_attention",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", f"-DPEDRO_NAMESPACE={namespace}"]
            + (["-DPEDRO_PORTABLE"] if portable else []),
            is_python_module=False,
        )
    except Exception as err:  # no compiler, no ninja, a read-only cache: the engine still serves, with SDPA
        log.warning("pedro's CPU decode attention kernel could not be built (%s); using SDPA", err)
        return None
    op: DecodeAttention = getattr(torch.ops, namespace).decode_attention
    return op
