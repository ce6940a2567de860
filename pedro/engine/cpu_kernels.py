"""The engine's own CPU kernels for bf16 and fp32 (prefill attention and PEDRO's scaling in bf16 only), built
from source on first use (kernels/cpu_kernels.cpp).

Why kernels of our own: a bf16 decode step on a CPU spent a third of its time in the flash kernel behind
``scaled_dot_product_attention``, which at one query per row spends more time blocking than reading the cache
-- a batch-32 SmolLM2 layer (3 KV heads of 3 queries, ~160 keys) took 1.04 ms there against 0.48 ms in
``decode_attention`` (1 thread, the 30 layers' caches in memory). That kernel is also the more exact of the two:
its probabilities stay in fp32, where the flash kernel rounds them to bf16. On x86 CPUs with AVX512-BF16 its
scores use the CPU's bf16 dot products; elsewhere plain loops the compiler vectorises. ``prefill_attention`` does a
prefill's RoPE, cache writes and causal attention for all its prompts in one call, where SDPA took a call per
prompt per layer (32 prompts of 96 tokens, SmolLM2's 30 layers, 2 threads: 71 ms against 305 ms; one 2,048-token prompt:
0.73 s against 1.50 s); it also
makes a chunk of a prompt compute exactly what the whole prompt's prefill computes. In fp32, decode attention
replaces two batched matmuls and a softmax (SmolLM2, batch 32, ~140 keys, 2 threads: 0.37 ms a layer against
~0.87 ms, RoPE and the cache writes included), its RoPE fp32's own roundings, bit for bit. ``rms_norm`` does a
backbone's RMSNorm in one pass where the module issues ~8 tensor ops (~40 us at a decode step's rows),
``silu_mul`` a gated MLP's activation and product in one (both in fp32 too), and ``scale_rows`` PEDRO's per-row scaling in one call
per point and layer where a prefill made one per prompt.

They are compiled by ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions) the first time an engine starts on a CPU,
~10-30 s, and loaded from there afterwards. Where they cannot be built, the engine runs torch's own ops and says
so once in its log.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from pedro.compat import norm_probe, rms_norm_form

log = logging.getLogger("pedro.engine")

SOURCE = Path(__file__).parent / "kernels" / "cpu_kernels.cpp"
HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 16  # query heads per KV head

# (q, k_new, v_new, cos, sin, k_cache, v_cache, slots, lengths, window, scale) -> out; the cache written in place
DecodeAttention = Callable[..., torch.Tensor]
# (q, k_new, v_new, cos, sin, k_cache, v_cache, rows, window, scale) -> out; the cache written in place
PrefillAttention = Callable[..., torch.Tensor]
# (gate, up) -> act(gate) * up; the kernel's also (gate, up, up_scale, scale_index): up scaled as scale_rows does
GatedActivation = Callable[..., torch.Tensor]
RowScale = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (x, table, index, out)


@functools.cache
def kernels(portable: bool = False) -> Optional[Any]:
    """The built kernels (``torch.ops`` namespace), or None where they cannot be built here.

    ``decode_attention(q, k_new, v_new, cos, sin, k, v, slots, lengths, window, scale) -> out``: q (B, kv_heads,
    group, head_dim) bf16 or fp32 (every tensor of the call alike; fp32 takes no scale tables); k_new, v_new (B, kv_heads, head_dim) the rows' new keys and values; q and k_new are
    rotated first (``compat.apply_rope``'s roundings, bit for bit; cos, sin (B, head_dim), sin as
    ``compat.rope_sin`` gives it), the key and value written into k, v (one layer's cache, (slots, kv_heads, S,
    head_dim)) at slot ``slots[b]``, position ``lengths[b]`` (int64); then row b attends that slot's keys;
    window: attend the last ``window`` keys (0: all). ``prefill_attention(q, k_new, v_new, cos, sin, k, v, rows,
    window, scale) -> out``: the same for a prefill's N packed tokens (q (N, kv_heads, group, head_dim), cos, sin
    (N, head_dim)), ``rows`` (R, 4) int64 naming each prompt's (or chunk's) slot, first token, tokens and first
    position; each token attends its slot up to its own position. Both take ``q_scale``, ``v_scale`` (per-row
    tables of PEDRO's z for the q and v projections' outputs, (table rows, width)) and ``scale_index`` (each row's
    or token's table row): q and v scaled as ``scale_rows`` would, as the kernel reads them. ``rms_norm(x, weight,
    eps, gemma) -> out``: x bf16 or fp32; weight x's dtype for LLaMA's form, fp32 ``1 + weight`` for Gemma's
    (``gemma``; ``compat.rms_norm_form``). ``silu_mul(gate, up, up_scale=None, scale_index=None) -> out``:
    ``silu(gate) * up`` for (rows, width) inputs whose rows are contiguous, bf16 or fp32, up first scaled by its
    (bf16) table where given. ``scale_rows(x, table, index, out)``:
    ``out[n] = x[n] + x[n] * table[index[n]]``, addcmul's numbers (out may be x).
    ``portable``: the plain loops even where the CPU has AVX512-BF16 (what other CPUs run: their test)."""
    namespace = "pedro_portable" if portable else "pedro"
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # pip's ninja, in an environment whose bin folder is not on PATH
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        load(
            name=f"{namespace}_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", f"-DPEDRO_NAMESPACE={namespace}"]
            + (["-DPEDRO_PORTABLE"] if portable else []),
            is_python_module=False,
        )
    except Exception as err:  # no compiler, no ninja, a read-only cache: the engine still serves, with torch's ops
        log.warning("pedro's CPU kernels could not be built (%s); using torch's own ops", err)
        return None
    return getattr(torch.ops, namespace)


def decode_attention(portable: bool = False) -> Optional[DecodeAttention]:
    """The decode attention kernel, or None where the kernels cannot be built."""
    ops = kernels(portable)
    return None if ops is None else ops.decode_attention


def prefill_attention(portable: bool = False) -> Optional[PrefillAttention]:
    """The prefill attention kernel, or None where the kernels cannot be built."""
    ops = kernels(portable)
    return None if ops is None else ops.prefill_attention


# how far a kernel's result may stray from torch's op, relative to it, per dtype: one bf16 step (rare: a sum in
# another order, exp's last bits, moving a value across a rounding boundary); a few fp32 steps (such differences
# are not rounded away in fp32, so they show in most elements, by a step or two)
TOLERANCE = {torch.bfloat16: 2**-7, torch.float32: 2**-20}


def _agrees(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Within the dtype's tolerance everywhere, and in bf16 equal almost everywhere."""
    close = (ours.float() - theirs.float()).abs() <= theirs.float().abs() * TOLERANCE[theirs.dtype]
    return bool(close.all()) and (theirs.dtype != torch.bfloat16 or bool((ours == theirs).float().mean() > 0.95))


def rms_norm(norm: nn.Module, portable: bool = False) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``norm`` (a bf16 or fp32 RMSNorm of a supported form) as the kernel, or None (another form or dtype, no
    kernels, or a kernel that strays from the module by more than rounding of the sum's order: checked here)."""
    form, ops = rms_norm_form(norm), kernels(portable)
    if form is None or ops is None or form[1].dtype not in (torch.bfloat16, torch.float32):
        return None
    kind, weight, eps = form
    module_weight: Any = norm.weight
    if weight.device.type != "cpu" or module_weight.dtype not in TOLERANCE:
        return None
    weight, gemma = weight.detach().contiguous(), kind == "gemma"

    def fn(x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x.contiguous(), weight, eps, gemma)

    with torch.no_grad():
        x = norm_probe(module_weight)
        return fn if _agrees(fn(x), norm(x)) else None


def silu_mul(
    act: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype = torch.bfloat16, portable: bool = False
) -> Optional[GatedActivation]:
    """``act(gate) * up`` as the kernel where ``act`` is SiLU, or None (another activation or dtype, or no
    kernels). Checked here against ``act`` on rows of ``dtype``: within the dtype's tolerance (exp's last bits
    may differ)."""
    ops = kernels(portable)
    if ops is None or dtype not in TOLERANCE:
        return None
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(4, 256, generator=g).mul_(6).to(dtype) for _ in range(2))
    with torch.no_grad():
        if not torch.equal(act(gate), torch.nn.functional.silu(gate)):
            return None
        if not _agrees(ops.silu_mul(gate, up), act(gate) * up):
            return None
    op: GatedActivation = ops.silu_mul
    return op


def scale_rows(portable: bool = False) -> Optional[RowScale]:
    """The row-scaling kernel, or None where the kernels cannot be built (or where it does not reproduce torch's
    ``addcmul`` bit for bit on a probe: then the engine keeps addcmul)."""
    ops = kernels(portable)
    if ops is None:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g).mul_(8).to(torch.bfloat16)
    table = torch.randn(4, 64, generator=g).mul_(0.05).to(torch.bfloat16)
    index = torch.tensor([3, 0, 0, 2, 1, 3])
    ours = torch.empty_like(x)
    ops.scale_rows(x, table, index, ours)
    if not torch.equal(ours, torch.addcmul(x, x, table[index])):
        return None
    op: RowScale = ops.scale_rows
    return op
