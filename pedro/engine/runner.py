"""The engine's model runner: the LLaMA-family decoder forward over the engine's own KV cache.

It reuses the backbone's modules and weights (embeddings, RMSNorms, rotary embedding, linear layers) and
re-implements only the glue that transformers' generic forward spends per-step Python and copies on: the
cache (pre-allocated slots instead of growing tensors), GQA (query heads grouped onto their KV head instead
of repeating K/V), masks (one per-row length mask per step) and per-row adapters (rows.py).

Prefill packs the new prompts into one (tokens, d) matrix: every linear layer is one GEMM over all of them,
attention runs per prompt (causal, no padding), and each PEDRO row's generators pool that row's states at each
layer -- pedro.generator.VectorGenerator itself, the same code the PEFT model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from pedro.engine.adapters import ModelSpec, PedroWeights
from pedro.engine.kv_cache import KVCache
from pedro.engine.rows import RowAdapters
from pedro.engine.vectors import generate_vectors

SUPPORTED = ("llama", "mistral", "qwen2")


def check_supported(model: nn.Module, max_seq_len: int) -> None:
    """The runner implements the LLaMA-family forward; refuse anything whose forward differs."""
    config = model.config
    if config.model_type not in SUPPORTED:
        raise ValueError(
            f"the engine's runner supports {list(SUPPORTED)}, not {config.model_type!r}; "
            "use transformers generate() with the PEFT model for this backbone"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
    if uses_window and window is not None and window < max_seq_len:
        raise ValueError(f"sliding-window attention ({window}) shorter than max_seq_len {max_seq_len} is not supported")


@dataclass
class PrefillBatch:
    """New rows (slots ``slots``) with prompts ``prompts``; tokens are packed in that order."""

    slots: list[int]
    prompts: list[list[int]]


class ModelRunner:
    def __init__(self, model: nn.Module, spec: ModelSpec, cache: KVCache, rows: RowAdapters) -> None:
        self.model, self.spec, self.cache, self.rows = model, spec, cache, rows
        self.config = model.config
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.linears = [
            {name: layer.get_submodule(path) for name, path in spec.module_paths.items()} for layer in self.layers
        ]
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_kv = self.config.num_key_value_heads
        self.group = self.config.num_attention_heads // self.n_kv
        self.act = self.layers[0].mlp.act_fn

    # ---------------------------------------------------------------------------------------- shared pieces

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.decoder.rotary_emb(x, positions.unsqueeze(0))
        return cos[0], sin[0]  # (N, head_dim)

    def _linear(self, layer: int, module: str, x: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        if ("in", module) in ctx.points:
            x = x * ctx.scale(layer, ("in", module))
        linear = self.linears[layer][module]
        y = F.linear(x, linear.weight, linear.bias)
        if module in ctx.lora:
            y = y + ctx.lora_delta(layer, module, x)
        if ("out", module) in ctx.points:
            y = y * ctx.scale(layer, ("out", module))
        return y

    def _forward(self, tokens: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        x = self.decoder.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            normed = layer.input_layernorm(x)
            if ctx.prefill is not None:
                self._run_generators(i, x, normed, ctx)
            q = self._linear(i, "q", normed, ctx)
            k = self._linear(i, "k", normed, ctx)
            v = self._linear(i, "v", normed, ctx)
            attend = self._attend_prefill if ctx.prefill is not None else self._attend_decode
            x = x + self._linear(i, "o", attend(i, q, k, v, ctx), ctx)
            h = layer.post_attention_layernorm(x)
            x = x + self._linear(i, "down", self.act(self._linear(i, "gate", h, ctx)) * self._linear(i, "up", h, ctx), ctx)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.decoder.norm(hidden)).float()

    # ---------------------------------------------------------------------------------------- prefill

    def _run_generators(self, layer: int, raw: torch.Tensor, normed: torch.Tensor, ctx: "_Context") -> None:
        """Each PEDRO row's generator for this layer pools that row's prompt states (prefill only)."""
        jobs, targets = [], {}
        for row, slot in enumerate(ctx.prefill.slots):
            entry = self.rows.row_entry[slot]
            weights = entry.weights if entry is not None else None
            if isinstance(weights, PedroWeights) and layer in weights.generators:
                jobs.append((row, weights.generators[layer], weights.config.pool_source))
                targets[row] = (slot, weights.slices[layer])
        if not jobs:
            return
        for rows, z in generate_vectors(jobs, raw, normed, ctx.pad_index, ctx.pad_mask):
            slots = torch.tensor([targets[row][0] for row in rows])
            self.rows.write_pedro(layer, slots, z, targets[rows[0]][1])  # one generator: one adapter's slices

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Run the prompts of new rows, fill their cache slots -> next-token logits (n_rows, vocab)."""
        lengths = [len(p) for p in batch.prompts]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        segments = list(zip([0] + ends[:-1], ends))
        tokens = torch.tensor([t for p in batch.prompts for t in p], dtype=torch.long)
        token_slots = torch.repeat_interleave(torch.tensor(batch.slots), torch.tensor(lengths))
        positions = torch.cat([torch.arange(n) for n in lengths])
        ctx = _Context(self.rows, token_slots, prefill=batch, segments=segments, lora_grouped=True)
        width = max(lengths)
        steps = torch.arange(width)
        ctx.pad_mask = steps[None, :] < torch.tensor(lengths)[:, None]
        ctx.pad_index = torch.where(ctx.pad_mask, torch.tensor([a for a, _ in segments])[:, None] + steps, 0)
        ctx.rope = self._rope(self.decoder.embed_tokens.weight[:1], positions)
        hidden = self._forward(tokens, ctx)
        for slot, n in zip(batch.slots, lengths):
            self.cache.lengths[slot] = n
        return self._logits(hidden[[end - 1 for end in ends]])

    def _attend_prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        cos, sin = ctx.rope
        q = q.view(-1, self.n_kv * self.group, self.head_dim).transpose(0, 1)  # (H, N, hd)
        k = k.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        v = v.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty_like(q)
        for slot, (start, end) in zip(ctx.prefill.slots, ctx.segments):
            ks, vs = k[:, start:end], v[:, start:end]
            self.cache.write_prompt(layer, slot, ks, vs)
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], ks[None], vs[None], is_causal=True, scale=self.scaling, enable_gqa=True
            )[0]
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    # ---------------------------------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..B-1 (``tokens`` (B,)) -> next-token logits (B, vocab)."""
        batch = tokens.shape[0]
        lengths = self.cache.lengths[:batch]
        ctx = _Context(self.rows, torch.arange(batch), prefill=None, segments=None, lora_grouped=False)
        ctx.rope = self._rope(self.decoder.embed_tokens.weight[:1], lengths)
        width = int(lengths.max()) + 1
        ctx.mask = (torch.arange(width) <= lengths[:, None]).view(batch, 1, 1, width)
        hidden = self._forward(tokens, ctx)
        self.cache.lengths[:batch] += 1
        return self._logits(hidden)

    def _attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        batch = q.shape[0]
        cos, sin = ctx.rope
        # query heads grouped onto their KV head: (B, kv_heads, group, hd) attends (B, kv_heads, W, hd)
        q = q.view(batch, self.n_kv, self.group, self.head_dim)
        k = k.view(batch, self.n_kv, self.head_dim)
        q = q * cos[:, None, None] + rotate_half(q) * sin[:, None, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        self.cache.write_step(layer, k, v.view(batch, self.n_kv, self.head_dim))
        keys, values = self.cache.view(layer, batch, ctx.mask.shape[-1])
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, scale=self.scaling)
        return out.reshape(batch, -1)


class _Context:
    """What one forward needs besides the tokens: which rows each token belongs to, live adapter points."""

    def __init__(
        self,
        rows: RowAdapters,
        token_slots: torch.Tensor,
        prefill: PrefillBatch | None,
        segments: list[tuple[int, int]] | None,
        lora_grouped: bool,
    ) -> None:
        self.rows, self.token_slots, self.prefill, self.segments = rows, token_slots, prefill, segments
        self.points = rows.live_points()
        self.lora = rows.live_lora()
        self.contiguous = prefill is None  # decode: token i is slot i, the per-row gather is a slice
        self.lora_rows = rows.lora_index.index_select(0, token_slots) if self.lora else None
        self.lora_grouped = lora_grouped
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None
        self.pad_index: torch.Tensor | None = None  # prefill: (rows, T_max) packed-token index of each prompt
        self.pad_mask: torch.Tensor | None = None

    def scale(self, layer: int, point: tuple[str, str]) -> torch.Tensor:
        table = self.rows.scales[point][layer]
        return table[: self.token_slots.shape[0]] if self.contiguous else table.index_select(0, self.token_slots)

    def lora_delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        if self.lora_grouped:
            return self.rows.lora_delta_grouped(layer, module, x, self.lora_rows)
        return self.rows.lora_delta(layer, module, x, self.lora_rows)

