"""The engine's CPU kernels (pedro/engine/cpu_kernels.py), both their builds (the CPU's bf16 dot products where
it has them, and the plain loops every other CPU runs). Decode and prefill attention: against attention computed
in float64 (decode also against SDPA's flash kernel), each row independent of its batch, of the thread count and
(prefill) of how its prompt was chunked, refusing what they cannot compute; a bf16 engine attending through them
follows transformers' bf16 forward (sliding windows included), gives each request in a mixed batch the tokens it
gets alone, and a prompt prefilled in chunks the numbers of its whole prefill. The norms, the gated activation
and the row scaling against torch's ops."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_model

import pedro
from pedro.compat import apply_rope, rope_sin
from pedro.engine import Engine, Request, SamplingParams, cpu_kernels
from pedro.engine.runner import ModelRunner

KERNELS = {"native": cpu_kernels.decode_attention(), "portable": cpu_kernels.decode_attention(portable=True)}


@pytest.fixture(params=list(KERNELS))
def kernel(request):
    op = KERNELS[request.param]
    assert op is not None, "the kernel did not build here (see the log)"
    return op


# the decode kernel serves bf16 and fp32 caches
DTYPES = [torch.bfloat16, torch.float32]
# one step of each dtype's significand: a value within STEP[dtype] * |value| of its exact one is rounded (nearly) right
STEP = {torch.bfloat16: 2**-7, torch.float32: 2**-23}


def case(
    head_dim: int,
    group: int,
    seed: int = 0,
    batch: int = 6,
    heads: int = 2,
    seq: int = 300,
    dtype: torch.dtype = torch.bfloat16,
):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch + 1, heads, seq, head_dim, generator=g).to(dtype)
    v = torch.randn(batch + 1, heads, seq, head_dim, generator=g).to(dtype)
    q = (2 * torch.randn(batch, heads, group, head_dim, generator=g)).to(dtype)
    lengths = torch.tensor([0, 15, 16, 17, 140, seq - 1])[:batch]  # one key; 16-key blocks and their edges
    return q, k, v, lengths


def attend(kernel, q, k, v, lengths, window: int, scale: float) -> torch.Tensor:
    """The kernel on a cache whose newest keys are already in place (row b in slot b): it writes them again."""
    rows = torch.arange(len(q))
    k_new, v_new = k[rows, :, lengths].contiguous(), v[rows, :, lengths].contiguous()
    cos, sin = identity_rope(q)
    return kernel(q, k_new, v_new, cos, sin, k, v, rows, lengths, window, scale)


def identity_rope(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos 1, sin 0: x * 1 + roll(x) * 0 is x, bit for bit."""
    return torch.ones(q.shape[0], q.shape[-1], dtype=q.dtype), torch.zeros(q.shape[0], q.shape[-1], dtype=q.dtype)


def reference(q, k, v, lengths, window: int, scale: float) -> torch.Tensor:
    out = []
    for b, last in enumerate(lengths.tolist()):
        first = max(0, last - window + 1) if window else 0
        keys, values = k[b, :, first : last + 1].double(), v[b, :, first : last + 1].double()
        out.append(torch.softmax(q[b].double() @ keys.transpose(-1, -2) * scale, -1) @ values)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group", [(64, 3), (64, 1), (128, 4), (256, 2)])
@pytest.mark.parametrize("window", [0, 5])
def test_the_kernel_is_correctly_rounded_almost_everywhere_and_closer_than_sdpa(kernel, head_dim, group, window, dtype):
    """bf16: each output within one bf16 step of the exact value, nearly all rounded right; fp32 (its sums in
    fp32, in another order than float64's): within a few fp32 steps."""
    q, k, v, lengths = case(head_dim, group, dtype=dtype)
    scale = head_dim**-0.5
    exact = reference(q, k, v, lengths, window, scale)
    out = attend(kernel, q, k, v, lengths, window, scale)
    assert out.dtype is dtype and out.shape == q.shape
    error = (out.double() - exact).abs()
    if dtype is torch.float32:  # a sum of ~300 terms of either sign: relative to the terms' size, not the sum's
        assert (error <= 2**-20 * v.abs().max()).all() and error.max() > 0  # not float64's numbers by chance
        return
    ulp = exact.abs().clamp_min(2**-60) * STEP[dtype]  # one bf16 step at each value
    assert (error <= ulp).all()
    assert (out == exact.to(dtype)).double().mean() > 0.995
    # SDPA over the same keys (its mask), as the engine attended before: further from the exact values
    width = int(lengths.max()) + 1
    steps = torch.arange(width)
    mask = steps <= lengths[:, None]
    if window:
        mask &= steps > lengths[:, None] - window
    sdpa = F.scaled_dot_product_attention(
        q, k[: len(q), :, :width], v[: len(q), :, :width], attn_mask=mask[:, None, None], scale=scale
    )
    assert (out.double() - exact).abs().mean() < (sdpa.double() - exact).abs().mean()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_alone_as_in_any_batch_at_any_thread_count(kernel, dtype):
    q, k, v, lengths = case(64, 3, seed=1, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = attend(kernel, q, k, v, lengths, 0, 0.125)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(attend(kernel, q, k, v, lengths, 0, 0.125), together)
    finally:
        torch.set_num_threads(threads)
    for b in range(len(q)):
        alone = attend(kernel, q[b : b + 1], k[b:], v[b:], lengths[b : b + 1], 0, 0.125)
        assert torch.equal(alone[0], together[b])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernel_rotates_and_writes_each_rows_new_key_and_value_into_its_slot_first(kernel, dtype):
    """RoPE as compat.apply_rope computes it, bit for bit (the keys a decode step caches are the ones the torch
    path cached; in fp32 too: each product rounded, no fused multiply-add), written at (slot, position) and
    nowhere else, then attended from that slot."""
    q, k, v, lengths = case(64, 3, seed=2, dtype=dtype)
    slots = torch.tensor([3, 0, 6, 1, 2, 4])  # row b's cache in slot slots[b] (6: a slot past the batch)
    g = torch.Generator().manual_seed(5)
    k_new, v_new = (torch.randn(len(q), 2, 64, generator=g).to(dtype) for _ in range(2))
    angles = lengths[:, None] * 10_000 ** -(torch.arange(64) % 32 / 32)
    cos, sin = angles.cos().to(dtype), rope_sin(angles.sin().to(dtype))
    before_k, before_v = k.clone(), v.clone()
    out = kernel(q, k_new, v_new, cos, sin, k, v, slots, lengths, 0, 0.125)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[slots, :, lengths] = apply_rope(k_new, cos[:, None], sin[:, None])
    expected_v[slots, :, lengths] = v_new
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
    rotated = apply_rope(q, cos[:, None, None], sin[:, None, None])
    exact = reference(rotated, k[slots], v[slots], lengths, 0, 0.125)
    if dtype is torch.float32:
        assert ((out.double() - exact).abs() <= 2**-20 * v.abs().max()).all()
        return
    assert ((out.double() - exact).abs() <= exact.abs().clamp_min(2**-60) * STEP[dtype]).all()
    assert (out == exact.to(dtype)).double().mean() > 0.995


def test_the_kernel_refuses_what_it_cannot_compute(kernel):
    q, k, v, lengths = case(64, 3)
    rows = torch.arange(len(q))
    k_new, v_new = k[rows, :, lengths].contiguous(), v[rows, :, lengths].contiguous()
    cos, sin = identity_rope(q)

    def call(q=q, k_new=k_new, v_new=v_new, cos=cos, sin=sin, k=k, v=v, rows=rows, lengths=lengths):
        return kernel(q, k_new, v_new, cos, sin, k, v, rows, lengths, 0, 0.125)

    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):
        call(q=q.float())
    as_float = {name: t.float() for name, t in dict(q=q, k_new=k_new, v_new=v_new, cos=cos, sin=sin, k=k, v=v).items()}
    table = torch.zeros(1, 2 * 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="scale tables are served in bfloat16 only"):
        kernel(
            *as_float.values(),
            rows,
            lengths,
            0,
            0.125,
            v_scale=table,
            scale_index=torch.zeros(len(q), dtype=torch.long),
        )
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(lengths=lengths + k.shape[2])
    with pytest.raises(RuntimeError, match="slot is outside"):
        call(rows=rows + 10)
    with pytest.raises(RuntimeError, match="head_dim"):
        call(*(t[..., :8].contiguous() for t in (q, k_new, v_new, cos, sin, k, v)))
    with pytest.raises(RuntimeError, match="lengths"):
        call(lengths=lengths[:2])
    with pytest.raises(RuntimeError, match=r"\(B, kv_heads, D\)"):
        call(k_new=k_new[:2], v_new=v_new[:2])
    with pytest.raises(RuntimeError, match="cos and sin"):
        call(cos=cos[:2])
    with pytest.raises(RuntimeError, match="each row of q"):
        call(q=q.transpose(1, 2))


def test_the_kernel_reads_rows_at_any_stride(kernel):
    """q, k and v as column slices of one fused product (the runner's fused q/k/v GEMM): the same bits."""
    q, k, v, lengths = case(64, 3, seed=6)
    rows = torch.arange(len(q))
    g = torch.Generator().manual_seed(7)
    fused = torch.randn(len(q), 3 * 2 * 64 + 2 * 64 + 2 * 64 + 32, generator=g).to(torch.bfloat16)
    fq, fk, fv = fused[:, :384], fused[:, 384:512], fused[:, 512:640]
    cos, sin = identity_rope(q)
    outs = []
    for args in (
        (fq.view(-1, 2, 3, 64), fk.view(-1, 2, 64), fv.view(-1, 2, 64)),
        (fq.contiguous().view(-1, 2, 3, 64), fk.contiguous().view(-1, 2, 64), fv.contiguous().view(-1, 2, 64)),
    ):
        cache_k, cache_v = k.clone(), v.clone()
        outs.append((kernel(*args, cos, sin, cache_k, cache_v, rows, lengths, 0, 0.125), cache_k, cache_v))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][0].is_contiguous()


PREFILL = {"native": cpu_kernels.prefill_attention(), "portable": cpu_kernels.prefill_attention(portable=True)}


@pytest.fixture(params=list(PREFILL))
def prefill_kernel(request):
    op = PREFILL[request.param]
    assert op is not None, "the kernel did not build here (see the log)"
    return op


def prefill_case(head_dim: int, group: int, heads: int, seed: int = 0):
    """Six rows: one token; 15, 16, 17 around a 16-key block; a chunk after 3 and after 16 cached positions; a
    40-token prompt and a 100-token chunk after 20 cached positions. Row r's cache in a slot of its own."""
    g = torch.Generator().manual_seed(seed)
    lengths, offsets, slots = [1, 15, 16, 17, 40, 100], [0, 0, 3, 16, 0, 20], [5, 0, 2, 1, 3, 6]
    n = sum(lengths)
    q = (2 * torch.randn(n, heads, group, head_dim, generator=g)).to(torch.bfloat16)
    k_new, v_new = (torch.randn(n, heads, head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(7, heads, 160, head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
    positions = torch.cat([torch.arange(o, o + m) for o, m in zip(offsets, lengths)])
    angles = positions[:, None] * 10_000 ** -(torch.arange(head_dim) % (head_dim // 2) / (head_dim // 2))
    cos, sin = angles.cos().to(torch.bfloat16), rope_sin(angles.sin().to(torch.bfloat16))
    firsts = [sum(lengths[:r]) for r in range(len(lengths))]
    rows = torch.tensor([list(r) for r in zip(slots, firsts, lengths, offsets)])
    return q, k_new, v_new, cos, sin, k, v, rows


def prefill_reference(q, k_new, v_new, cos, sin, k, v, rows, window: int, scale: float):
    """The cache as the kernel should leave it (new keys rotated by compat.apply_rope) and each query's
    attention over its slot's keys up to its own position, in float64."""
    k, v = k.clone(), v.clone()
    rotated_k = apply_rope(k_new, cos[:, None], sin[:, None])
    rotated_q = apply_rope(q, cos[:, None, None], sin[:, None, None])
    out = torch.empty(q.shape, dtype=torch.float64)
    for slot, first, n, offset in rows.tolist():
        k[slot, :, offset : offset + n] = rotated_k[first : first + n].transpose(0, 1)
        v[slot, :, offset : offset + n] = v_new[first : first + n].transpose(0, 1)
        for i in range(n):
            last = offset + i
            start = max(0, last - window + 1) if window else 0
            keys, values = k[slot, :, start : last + 1].double(), v[slot, :, start : last + 1].double()
            scores = torch.einsum("hgd,hjd->hgj", rotated_q[first + i].double(), keys) * scale
            out[first + i] = torch.einsum("hgj,hjd->hgd", torch.softmax(scores, -1), values)
    return out, k, v


@pytest.mark.parametrize("head_dim,group,heads", [(64, 3, 3), (64, 1, 2), (128, 4, 2), (256, 2, 1), (64, 6, 1)])
@pytest.mark.parametrize("window", [0, 5, 17])
def test_the_prefill_kernel_writes_the_rotated_keys_and_attends_each_query_causally(
    prefill_kernel, head_dim, group, heads, window
):
    """Whole prompts and chunks after cached positions, sliding windows, block edges: the cache bit for bit as
    compat.apply_rope writes it, each query's output within a bf16 step of attention in float64 (where a sum of
    values cancels to near 0, within fp32's absolute error of it)."""
    args = prefill_case(head_dim, group, heads)
    scale = head_dim**-0.5
    exact, k, v = prefill_reference(*args, window, scale)
    out = prefill_kernel(*args, window, scale)
    assert out.dtype is torch.bfloat16 and out.shape == args[0].shape and out.is_contiguous()
    assert torch.equal(args[5], k) and torch.equal(args[6], v)  # written in place, nothing else touched
    ulp = exact.abs() * 2**-7 + 1e-6
    assert ((out.double() - exact).abs() <= ulp).all()
    assert (out == exact.to(torch.bfloat16)).double().mean() > 0.995


def test_a_prefill_query_gets_the_same_bits_alone_in_chunks_in_any_batch_at_any_thread_count(prefill_kernel):
    """A token's output depends on its query and its slot's keys only: the same bits whether its prompt runs
    with others, alone, or in chunks after its earlier positions were cached, at any thread count."""
    q, k_new, v_new, cos, sin, k, v, rows = prefill_case(64, 3, 3, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = prefill_kernel(q, k_new, v_new, cos, sin, k.clone(), v.clone(), rows, 0, 0.125)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(prefill_kernel(q, k_new, v_new, cos, sin, k.clone(), v.clone(), rows, 0, 0.125), together)
    finally:
        torch.set_num_threads(threads)
    slot, first, n, offset = rows[5].tolist()  # 100 tokens after 20 cached: alone, then as chunks of 30 and 70
    cache_k, cache_v = k.clone(), v.clone()
    part = slice(first, first + n)
    alone = prefill_kernel(
        q[part],
        k_new[part],
        v_new[part],
        cos[part],
        sin[part],
        cache_k,
        cache_v,
        torch.tensor([[slot, 0, n, offset]]),
        0,
        0.125,
    )
    assert torch.equal(alone, together[part])
    cache_k, cache_v = k.clone(), v.clone()
    chunks = []
    for a, b in ((0, 30), (30, n)):
        piece = slice(first + a, first + b)
        rows_of = torch.tensor([[slot, 0, b - a, offset + a]])
        chunks.append(
            prefill_kernel(
                q[piece], k_new[piece], v_new[piece], cos[piece], sin[piece], cache_k, cache_v, rows_of, 0, 0.125
            )
        )
    assert torch.equal(torch.cat(chunks), together[part])


def test_the_prefill_kernel_reads_column_slices_and_refuses_what_it_cannot_compute(prefill_kernel):
    q, k_new, v_new, cos, sin, k, v, rows = prefill_case(64, 3, 3, seed=2)
    fused = torch.cat([q.flatten(1), k_new.flatten(1), v_new.flatten(1)], 1)  # one fused q/k/v product
    sliced = fused[:, :576].view(-1, 3, 3, 64), fused[:, 576:768].view(-1, 3, 64), fused[:, 768:].view(-1, 3, 64)
    expected = prefill_kernel(q, k_new, v_new, cos, sin, k.clone(), v.clone(), rows, 0, 0.125)
    assert torch.equal(prefill_kernel(*sliced, cos, sin, k.clone(), v.clone(), rows, 0, 0.125), expected)

    def call(q=q, rows=rows, k=k):
        return prefill_kernel(q, k_new, v_new, cos, sin, k, v, rows, 0, 0.125)

    with pytest.raises(RuntimeError, match="bfloat16"):
        call(q=q.float())
    with pytest.raises(RuntimeError, match="in order"):
        call(rows=rows[1:])  # the first row's token named by no row
    with pytest.raises(RuntimeError, match="same slot"):
        call(rows=rows.clone().index_put_((torch.tensor([1]), torch.tensor([0])), torch.tensor(5)))
    with pytest.raises(RuntimeError, match="positions are outside"):
        call(rows=rows.clone().index_put_((torch.tensor([5]), torch.tensor([3])), torch.tensor(100)))
    with pytest.raises(RuntimeError, match="slot is outside"):
        call(rows=rows.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(7)))
    with pytest.raises(RuntimeError, match=r"\(R, 4\)"):
        call(rows=rows[:, :3].contiguous())
    with pytest.raises(RuntimeError, match="each row of q"):
        call(q=q.transpose(1, 2))


@pytest.mark.parametrize("portable", [False, True])
def test_the_kernels_scale_q_v_and_up_as_they_read_them_exactly_as_scale_rows_first(portable):
    """PEDRO's scaling fused into the kernels that read the scaled outputs: the same bits as scale_rows applied
    first and the kernels run on its outputs (decode and prefill attention, the gated activation)."""
    ops = cpu_kernels.kernels(portable)
    g = torch.Generator().manual_seed(9)

    def tables(rows: int, width: int) -> torch.Tensor:
        return torch.randn(rows, width, generator=g).mul_(0.05).to(torch.bfloat16)

    def scaled(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = torch.empty_like(flat)
        ops.scale_rows(flat, table, index, out)
        return out.view(x.shape)

    # decode: 6 rows, each its own table row
    q, k, v, lengths = case(64, 3, seed=10)
    rows = torch.arange(len(q))
    k_new, v_new = k[rows, :, lengths].contiguous(), v[rows, :, lengths].contiguous()
    cos, sin = identity_rope(q)
    zq, zv, index = tables(9, 2 * 3 * 64), tables(9, 2 * 64), torch.tensor([4, 0, 8, 1, 1, 3])
    fused_k, fused_v = k.clone(), v.clone()
    fused = ops.decode_attention(
        q, k_new, v_new, cos, sin, fused_k, fused_v, rows, lengths, 0, 0.125, q_scale=zq, v_scale=zv, scale_index=index
    )
    first = ops.decode_attention(
        scaled(q, zq, index), k_new, scaled(v_new, zv, index), cos, sin, k, v, rows, lengths, 0, 0.125
    )
    assert torch.equal(fused, first) and torch.equal(fused_k, k) and torch.equal(fused_v, v)
    # prefill: every token its row's table row
    q, k_new, v_new, cos, sin, k, v, prefill_rows = prefill_case(64, 3, 3, seed=11)
    zq, zv = tables(7, 3 * 3 * 64), tables(7, 3 * 64)
    index = torch.cat([torch.full((n,), slot) for slot, _, n, _ in prefill_rows.tolist()])
    fused_k, fused_v = k.clone(), v.clone()
    fused = ops.prefill_attention(
        q, k_new, v_new, cos, sin, fused_k, fused_v, prefill_rows, 0, 0.125, q_scale=zq, v_scale=zv, scale_index=index
    )
    first = ops.prefill_attention(
        scaled(q, zq, index), k_new, scaled(v_new, zv, index), cos, sin, k, v, prefill_rows, 0, 0.125
    )
    assert torch.equal(fused, first) and torch.equal(fused_k, k) and torch.equal(fused_v, v)
    # the gated activation, up a column slice of a fused product
    fused_product = torch.randn(20, 2 * 96, generator=g).mul_(4).to(torch.bfloat16)
    gate, up = fused_product[:, :96], fused_product[:, 96:]
    zu, index = tables(5, 96), torch.randint(0, 5, (20,), generator=g)
    assert torch.equal(ops.silu_mul(gate, up, zu, index), ops.silu_mul(gate, scaled(up, zu, index)))
    with pytest.raises(RuntimeError, match="outside the tables"):
        ops.silu_mul(gate, up, zu, index + 5)
    with pytest.raises(RuntimeError, match="scale_index"):
        ops.silu_mul(gate, up, zu, None)
    with pytest.raises(RuntimeError, match="up_scale must be"):
        ops.silu_mul(gate, up, zu[:, :90].contiguous(), index)
    with pytest.raises(RuntimeError, match="v_scale must be"):
        ops.prefill_attention(
            q,
            k_new,
            v_new,
            cos,
            sin,
            k,
            v,
            prefill_rows,
            0,
            0.125,
            v_scale=zq,
            scale_index=torch.zeros(len(q), dtype=torch.long),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])  # LLaMA's form, Gemma's form, q/k norms
def test_the_norm_kernel_is_each_norm_within_one_step_of_its_dtype(family, portable, dtype):
    """bf16: within one bf16 step of the module everywhere, equal in 99 %+ of elements; fp32: within a few fp32
    steps (the squares summed in another order move most of a row by a step)."""
    model = tiny_model(family, hidden_size=576).to(dtype)
    norms = [m for name, m in model.named_modules() if name.endswith("norm")]
    assert len(norms) >= 7
    g = torch.Generator().manual_seed(3)
    for norm in norms:
        with torch.no_grad():
            norm.weight.normal_(0.5, 0.5, generator=g)  # not the all-ones (or all-zeros) of a fresh model
        fn = cpu_kernels.rms_norm(norm, portable)
        assert fn is not None, type(norm).__name__
        width = norm.weight.shape[0]
        x = (torch.randn(40, 3, width, generator=g) * torch.logspace(-3, 3, 40)[:, None, None]).to(dtype)
        x[0] = 0  # a row of zeros: its variance is 0, the output 0
        with torch.no_grad():
            ours, theirs = fn(x), norm(x)
        assert ours.dtype is dtype and ours.shape == x.shape and not ours[0].any()
        assert ((ours.double() - theirs.double()).abs() <= theirs.double().abs() * cpu_kernels.TOLERANCE[dtype]).all()
        assert (ours == theirs).float().mean() > (0.99 if dtype is torch.bfloat16 else 0.3)


def test_the_norm_kernel_takes_only_what_it_computes():
    model = tiny_model("llama", hidden_size=64).half()
    assert cpu_kernels.rms_norm(model.model.norm) is None  # fp16: torch's ops
    assert cpu_kernels.rms_norm(torch.nn.LayerNorm(64).to(torch.bfloat16)) is None  # another form
    ops = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops.rms_norm(torch.randn(2, 64).half(), torch.ones(64).half(), 1e-6, False)
    with pytest.raises(RuntimeError, match="x's dtype"):
        ops.rms_norm(torch.randn(2, 64), torch.ones(64, dtype=torch.bfloat16), 1e-6, False)
    with pytest.raises(RuntimeError, match="Gemma's form"):
        ops.rms_norm(torch.randn(2, 64).to(torch.bfloat16), torch.ones(64, dtype=torch.bfloat16), 1e-6, True)
    with pytest.raises(RuntimeError, match="as wide"):
        ops.rms_norm(torch.randn(2, 64).to(torch.bfloat16), torch.ones(32, dtype=torch.bfloat16), 1e-6, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
def test_the_gated_activation_kernel_is_silu_times_up_on_column_slices_and_special_values(portable, dtype):
    gated = cpu_kernels.silu_mul(torch.nn.functional.silu, dtype, portable)
    assert gated is not None
    g = torch.Generator().manual_seed(4)
    fused = (torch.randn(50, 2 * 384, generator=g) * torch.logspace(-2, 2, 50)[:, None]).to(dtype)
    fused[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.0])
    gate, up = fused[:, :384], fused[:, 384:]  # one fused GEMM's two column slices, as the runner passes them
    ours, theirs = gated(gate, up), torch.nn.functional.silu(gate) * up
    assert ours.shape == theirs.shape and ours.dtype is dtype
    assert torch.equal(ours[0].isnan(), theirs[0].isnan())
    finite = theirs.isfinite()
    assert torch.equal(ours.isfinite(), finite)
    error = (ours.double() - theirs.double())[finite].abs()
    assert (error <= theirs.double()[finite].abs() * cpu_kernels.TOLERANCE[dtype]).all()
    assert (ours[finite] == theirs[finite]).float().mean() > (0.99 if dtype is torch.bfloat16 else 0.5)
    assert cpu_kernels.silu_mul(torch.nn.functional.gelu, dtype, portable) is None  # another activation: torch's
    assert cpu_kernels.silu_mul(torch.nn.functional.silu, torch.float16, portable) is None  # another dtype
    ops = cpu_kernels.kernels(portable)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.silu_mul(gate, up[:, :10])
    with pytest.raises(RuntimeError, match="both bfloat16 or both float32"):
        ops.silu_mul(gate, up.half())
    if dtype is torch.float32:
        with pytest.raises(RuntimeError, match="scale tables are served in bfloat16 only"):
            ops.silu_mul(gate, up, torch.zeros(1, 384, dtype=torch.bfloat16), torch.zeros(50, dtype=torch.long))


@pytest.mark.parametrize("portable", [False, True])
def test_the_row_scaling_kernel_is_addcmul_bit_for_bit(portable):
    """PEDRO's x + x * z with each row's vector picked by index, in place on a fused product's column slice and
    into another tensor: torch's addcmul's numbers exactly."""
    scale = cpu_kernels.scale_rows(portable)
    assert scale is not None
    g = torch.Generator().manual_seed(8)
    fused = torch.randn(40, 3 * 96, generator=g).mul_(10).to(torch.bfloat16)
    table = torch.randn(7, 96, generator=g).mul_(1e-3).to(torch.bfloat16)  # small effects: where 1 + z would round
    table[2] = torch.randn(96, generator=g).to(torch.bfloat16)
    index = torch.randint(0, 7, (40,), generator=g)
    x = fused[:, 96:192]
    expected = torch.addcmul(x, x, table[index])
    into = torch.empty(40, 96, dtype=torch.bfloat16)
    scale(x, table, index, into)
    assert torch.equal(into, expected)
    before = fused.clone()
    scale(x, table, index, x)  # in place, on the slice only
    assert torch.equal(x, expected)
    assert torch.equal(fused[:, :96], before[:, :96]) and torch.equal(fused[:, 192:], before[:, 192:])
    ops = cpu_kernels.kernels(portable)
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.scale_rows(x, table, index + 7, x)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.scale_rows(x.float(), table, index, x)


def test_a_kernel_that_cannot_be_built_is_none_and_said(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that fails every build
    with caplog.at_level(logging.WARNING, logger="pedro.engine"):
        assert cpu_kernels.kernels.__wrapped__(portable=True) is None
    assert "could not be built" in caplog.text and "using torch's own ops" in caplog.text


def sharp(family: str, **overrides) -> torch.nn.Module:
    """A tiny backbone with head_dim 64 (a size the kernel computes) and a scaled-up LM head: confident next
    tokens, so that a wrong token cannot hide in a near-tie."""
    model = tiny_model(family, head_dim=64, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers of 16 keys
def test_a_bf16_engine_attends_through_the_kernel_and_follows_transformers(family):
    engine = Engine(sharp(family), max_batch=5, max_seq_len=64)
    assert engine.runner.attention_kernel is not None and engine.runner.prefill_kernel is not None
    prompts = [[3 + i, 7, 11 + 2 * i, 5, *range(20, 20 + 7 * i)] for i in range(5)]  # up to 32 tokens
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0)
    together = engine.generate([Request(p, sampling=greedy) for p in prompts])
    model = sharp(family)
    for prompt, out in zip(prompts, together):
        [alone] = engine.generate([Request(prompt, sampling=greedy)])
        assert alone.token_ids == out.token_ids  # a mixed batch equals each request alone
        assert [x.logprob for x in alone.logprobs] == [x.logprob for x in out.logprobs]
        ids = torch.tensor([prompt + out.token_ids])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        gap = logits.max(-1).values - chosen
        assert (gap <= 0.05 * logits.abs().max(-1).values).all(), gap
        assert (gap == 0).float().mean() >= 0.8
        # the chosen tokens' log-probabilities within bf16's noise of transformers' (0.03 here; attending past
        # gemma3's sliding window instead moves them by 0.3)
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (expected - torch.tensor([x.logprob for x in out.logprobs])).abs().max() < 0.1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_bf16_prompt_prefilled_in_chunks_gets_the_whole_prefills_tokens_bit_for_bit(family, monkeypatch):
    """A prompt split into chunks of 5 tokens while another row decodes (each chunk's queries attending the
    cached positions before it, across gemma3's 16-key window) against the same prompt prefilled whole: the
    kernel computes each query the same way in both, so tokens and log-probabilities are the same numbers."""
    starts: list[int] = []
    run = ModelRunner.run

    def recorded(self, tokens, batch):
        if batch is not None:
            starts.extend(batch.starts or [0] * len(batch.prompts))
        return run(self, tokens, batch)

    monkeypatch.setattr(ModelRunner, "run", recorded)
    prompt = [3 + (7 * i) % 50 for i in range(30)]
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0)
    outs = []
    for budget in (5, 256):
        engine = Engine(sharp(family), max_batch=2, max_seq_len=64, max_prefill_tokens=budget)
        engine.add_request(Request([9, 4, 6], sampling=SamplingParams(max_new_tokens=40, ignore_eos=True)))
        while not engine.num_running:
            engine.step()
        starts.clear()
        [out] = engine.generate([Request(prompt, sampling=greedy)])
        assert starts == ([0, 5, 10, 15, 20, 25] if budget == 5 else [0])
        outs.append((out.token_ids, [x.logprob for x in out.logprobs]))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_bf16_pedro_prompt_split_inside_its_layers_gets_the_whole_prefills_numbers(family, tmp_path, monkeypatch):
    """A 30-token PEDRO prompt in runs of 15 token-layers (half a layer each) while another row decodes: each
    layer's vectors from the whole prompt, its positions in two steps, the second half attending the first
    half's cached keys (across gemma3's 16-key window) -- the same tokens and log-probabilities, bit for bit."""
    peft_model = pedro.get_pedro_model(tiny_model(family, head_dim=64), pedro.PedroConfig(r=4))
    randomize(peft_model, seed=3, scale=0.5)
    peft_model.save_pretrained(str(tmp_path / "p"))
    runs: list[tuple[int, int]] = []
    prefill_layers = ModelRunner.prefill_layers

    def recorded(self, state, end):
        runs.append((state.done * len(state.prompt) + state.position, end))
        return prefill_layers(self, state, end)

    monkeypatch.setattr(ModelRunner, "prefill_layers", recorded)
    prompt = [3 + (7 * i) % 50 for i in range(30)]
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0)
    outs = []
    for budget in (5, 256):
        engine = Engine(sharp(family), max_batch=2, max_seq_len=64, max_prefill_tokens=budget)
        engine.add_adapter("p", str(tmp_path / "p"))
        engine.add_request(Request([9, 4, 6], sampling=SamplingParams(max_new_tokens=40, ignore_eos=True)))
        while not engine.num_running:
            engine.step()
        runs.clear()
        [out] = engine.generate([Request(prompt, adapter="p", sampling=greedy)])
        assert runs == ([(a, a + 15) for a in range(0, 90, 15)] if budget == 5 else [])
        outs.append((out.token_ids, [x.logprob for x in out.logprobs]))
    assert outs[0] == outs[1]


def test_without_the_kernel_the_engine_attends_with_sdpa(monkeypatch):
    tokens = {}
    for kernel in (True, False):
        engine = Engine(sharp("llama"), max_batch=2, max_seq_len=64, cpu_kernels=kernel)
        assert (engine.runner.attention_kernel is not None) is kernel
        [out] = engine.generate([Request([5, 6, 7, 8], sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))])
        tokens[kernel] = out.token_ids
    assert tokens[True] == tokens[False]  # a confident model: the two attentions pick the same tokens
    monkeypatch.setattr(cpu_kernels, "kernels", lambda portable=False: None)  # where they cannot be built
    assert Engine(sharp("llama"), max_batch=2, max_seq_len=64).runner.attention_kernel is None


@pytest.mark.parametrize(
    "family, fused",
    [
        ("llama", {("out", "q"), ("out", "v"), ("out", "up")}),
        ("gemma3", {("out", "v")}),  # q goes through a norm before attention, up through GELU: scale_rows for them
    ],
)
def test_pedro_rows_scaled_by_the_kernels_get_exactly_addcmuls_tokens(tmp_path, monkeypatch, family, fused):
    """Two PEDRO tenants and a bare row in one bf16 batch, prefill and decode, scaled by the kernels (q and v by
    the attention kernels as they read them, up by the gated activation's, the rest by the row-scaling kernel)
    and by torch's addcmul: the same tokens and log-probabilities, bit for bit."""
    mixed = []
    run = ModelRunner.run

    def recorded(self, tokens, batch):
        mixed.append(tokens is not None and batch is not None)
        return run(self, tokens, batch)

    monkeypatch.setattr(ModelRunner, "run", recorded)
    for seed in (1, 2):
        peft_model = pedro.get_pedro_model(tiny_model(family, head_dim=64), pedro.PedroConfig(r=4))
        randomize(peft_model, seed=seed, scale=0.5)
        peft_model.save_pretrained(str(tmp_path / f"p{seed}"))
    outs = []
    for kernel in (True, False):
        # a budget of 4 prompt tokens a step: the bare row's 9-token prompt, arriving while the PEDRO rows decode,
        # runs in chunks in their decode forwards (one forward, two parts: the kernels' table rows for both)
        engine = Engine(sharp(family), max_batch=4, max_seq_len=64, max_prefill_tokens=4)
        assert engine.runner.scale_kernel is not None and engine.runner.kernel_points == fused
        if not kernel:
            engine.runner.scale_kernel = None  # the contexts then scale with addcmul, as without kernels
        for seed in (1, 2):
            engine.add_adapter(f"p{seed}", str(tmp_path / f"p{seed}"))
        sampling = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=0)
        requests = [
            Request([3 + i, 9, 14, 5, 8][: 3 + i], adapter=a, sampling=sampling) for i, a in enumerate(["p1", "p2"])
        ]
        requests.append(Request([7, 3, 9, 12, 4, 8, 5, 11, 6], sampling=sampling))
        finished = {}
        for step in range(100):
            for r in requests[:2] if step == 0 else requests[2:] if step == 2 else ():
                engine.add_request(r)
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert len(finished) == 3 and any(mixed)
        mixed.clear()
        outs.append(
            [(o.token_ids, [x.logprob for x in o.logprobs]) for o in (finished[r.request_id] for r in requests)]
        )
    assert outs[0] == outs[1]
