"""A reference decode step for a LLaMA-family model, written the way gpt-fast writes one: the whole step in one
function over a static KV cache (every row at its own position, keys attended up to a fixed width under a
length mask), compiled with ``torch.compile(fullgraph=True)`` (fused element-wise kernels) and, on a GPU, captured in
one CUDA graph -- what gpt-fast's mode="reduce-overhead" amounts to. It serves no adapter: it is the step time a bare decode of the
same model can reach, which benchmarks/gpu_check.py sets the engine's bare step against.

Its correctness is checked, not assumed: ``check`` feeds a prompt through it one token per step and compares
the last logits with the transformers model's own forward.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F


class StaticDecode:
    """One decode step of ``model`` (a LLaMA-family transformers model) for ``batch`` rows, keys up to ``width``."""

    def __init__(self, model: Any, batch: int, width: int) -> None:
        config = model.config
        self.layers = [
            {
                "norm1": layer.input_layernorm.weight,
                "q": layer.self_attn.q_proj.weight,
                "k": layer.self_attn.k_proj.weight,
                "v": layer.self_attn.v_proj.weight,
                "o": layer.self_attn.o_proj.weight,
                "norm2": layer.post_attention_layernorm.weight,
                "gate": layer.mlp.gate_proj.weight,
                "up": layer.mlp.up_proj.weight,
                "down": layer.mlp.down_proj.weight,
            }
            for layer in model.model.layers
        ]
        self.embed, self.norm, self.head = (
            model.model.embed_tokens.weight,
            model.model.norm.weight,
            model.lm_head.weight,
        )
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.inv_freq = model.model.rotary_emb.inv_freq
        self.rope_scale = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        # one cache tensor per layer: a step's write into a view of one tensor holding every layer's cache is
        # functionalised by the compiler into a copy of that whole tensor per layer (on the CPU, 70 % of the
        # compiled step went to those copies)
        shape = (batch, self.kv_heads, width, self.head_dim)
        dtype, device = self.embed.dtype, self.embed.device
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.rows = torch.arange(batch, device=device)
        self.keys = torch.arange(width, device=device)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B,) -> logits (B, vocab) in float32; writes each row's key and value."""
        batch = tokens.shape[0]
        x = F.embedding(tokens, self.embed)
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None, :]
        mask = (self.keys[None, :] <= positions[:, None]).view(batch, 1, 1, -1)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w["norm1"], self.eps)
            q = F.linear(h, w["q"]).view(batch, self.heads, self.head_dim)
            k = F.linear(h, w["k"]).view(batch, self.kv_heads, self.head_dim)
            v = F.linear(h, w["v"]).view(batch, self.kv_heads, self.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k[i][self.rows, :, positions] = k
            self.v[i][self.rows, :, positions] = v
            a = F.scaled_dot_product_attention(q[:, :, None], self.k[i], self.v[i], attn_mask=mask, enable_gqa=True)
            x = x + F.linear(a.reshape(batch, -1), w["o"])
            h = F.rms_norm(x, (x.shape[-1],), w["norm2"], self.eps)
            x = x + F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])
        return F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.head).float()


def check(model: Any, prompt: list[int]) -> float:
    """Max |logit difference| after ``prompt``, fed one token per step, against the model's own forward."""
    ref = StaticDecode(model, 1, len(prompt))
    with torch.inference_mode():
        for i, token in enumerate(prompt):
            device = ref.embed.device
            logits = ref.step(torch.tensor([token], device=device), torch.tensor([i], device=device))
        expected = model(torch.tensor([prompt], device=ref.embed.device)).logits[0, -1].float()
    return float((logits[0] - expected).abs().max())


def step_times(
    model: Any, batch: int, width: int, start: int, steps: int, compile_step: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Time ``steps`` decode steps of ``batch`` rows from position ``start`` (start + steps <= width; the cache
    holds zeros: a step's time does not depend on what the keys are), each step's tokens read on the host as an
    engine reads them. -> compile seconds, median step ms; on a CPU also the median of the process's CPU time
    per step, which time spent descheduled by other jobs on the machine does not inflate."""
    ref = StaticDecode(model, batch, width)
    fn = torch.compile(ref.step, fullgraph=True) if compile_step else ref.step
    device = ref.embed.device
    tokens = torch.randint(3, model.config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), start, device=device)
    began = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):  # compile; choose kernels
            fn(tokens, positions)
        if device.type == "cuda":
            fn = _graphed(fn, tokens, positions)
        compile_s = time.perf_counter() - began
        log(
            f"reference step ready in {compile_s:.1f} s (compiled: {compile_step}, CUDA graph: {device.type == 'cuda'})"
        )
        times, cpu_times = [], []
        for i in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = fn(tokens, torch.full((batch,), start + i, device=device)).argmax(-1)
            tokens.tolist()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    result = {
        "compiled": compile_step,
        "cuda_graph": device.type == "cuda",
        "compile_s": compile_s,
        "step_p50_ms": 1e3 * statistics.median(times),
    }
    if device.type == "cpu":
        result["step_cpu_p50_ms"] = 1e3 * statistics.median(cpu_times)
    return result


def _graphed(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn`` captured in one CUDA graph over static inputs (what mode="reduce-overhead" does, without its
    checks for inputs that a step mutates: this one writes its cache in place, at fixed addresses)."""
    static_tokens, static_positions = tokens.clone(), positions.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_tokens, static_positions)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = fn(static_tokens, static_positions)

    def replay(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    return replay
