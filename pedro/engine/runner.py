"""The engine's model runner: the LLaMA-family and Gemma 3 decoder forward over the engine's own KV cache.

It reuses the backbone's modules and weights (embeddings, RMSNorms, rotary embedding, linear layers) and
re-implements only the glue that transformers' generic forward spends per-step Python and copies on: the
cache (pre-allocated slots instead of growing tensors), GQA (query heads grouped onto their KV head instead
of repeating K/V), masks (one per-row length mask per step, and its windowed copy for sliding layers) and
per-row adapters (rows.py).

Prefill packs the new prompts into one (tokens, d) matrix: every linear layer is one GEMM over all of them,
attention runs per prompt (causal, banded on sliding layers, no padding), and each PEDRO row's generators
pool that row's states at each layer -- pedro.generator.VectorGenerator itself, the same code the PEFT model
runs.

One forward serves every family: its ``pedro.backbones.LayerMap`` says what its decoder layer adds to LLaMA's (Gemma 3:
QK-norm, sandwich norms, sliding-window and global layers with their own RoPE), and each layer's pieces are
resolved once at construction, so a LLaMA step pays only a few ``is None`` checks for the features it lacks
(measured: no difference in a step's time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pedro.backbones import LAYER_MAPS, LayerMap, layer_map
from pedro.compat import check_rotary, mlp_activation, rotary_cos_sin, rotate_half
from pedro.engine.adapters import ModelSpec, PedroWeights
from pedro.engine.kv_cache import KVCache
from pedro.engine.rows import RowAdapters
from pedro.engine.sampling import ranked
from pedro.engine.vectors import generate_vectors

PROMPT_LOGPROB_CHUNK = 256  # prompt positions per log-softmax: bounds the (positions, vocab) float32 temporary


SLIDING = "sliding_attention"


def check_supported(model: nn.Module, max_seq_len: int) -> None:
    """The runner implements the forwards of the families whose LayerMap has ``engine``; refuse anything else."""
    config = model.config
    family = LAYER_MAPS.get(config.model_type)
    if family is None or not family.engine:
        served = [name for name, m in LAYER_MAPS.items() if m.engine]
        raise ValueError(
            f"the engine's runner supports {served}, not {config.model_type!r}; "
            "use transformers generate() with the PEFT model for this backbone"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit softcapping is not supported (scaled_dot_product_attention has no softcap)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention is not supported: the engine generates causally")
    window = getattr(config, "sliding_window", None)  # per-layer windows (a family's layer_types) are served
    uses_window = not family.layer_types and getattr(
        config, "use_sliding_window", config.model_type == "mistral"
    )
    if uses_window and window is not None and window < max_seq_len:
        raise ValueError(f"sliding-window attention ({window}) shorter than max_seq_len {max_seq_len} is not supported")


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the forward runs it: its norms (None where the family has none) and attention type."""

    input_norm: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    attn_out_norm: nn.Module | None
    mlp_in_norm: nn.Module
    mlp_out_norm: nn.Module | None
    rope: str | None  # key of this layer's (cos, sin): its layer type, None for one RoPE for all layers
    window: int | None  # sliding window (keys within ``window`` positions, itself included) or None: global

    @classmethod
    def of(cls, layer: nn.Module, index: int, family: LayerMap, config: Any) -> "_Layer":
        attn = layer.self_attn
        kind = config.layer_types[index] if family.layer_types else None
        sandwich = family.sandwich_norms
        return cls(
            input_norm=layer.input_layernorm,
            q_norm=attn.q_norm if family.qk_norm else None,
            k_norm=attn.k_norm if family.qk_norm else None,
            attn_out_norm=layer.post_attention_layernorm if sandwich else None,
            mlp_in_norm=layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
            mlp_out_norm=layer.post_feedforward_layernorm if sandwich else None,
            rope=kind,
            window=config.sliding_window if kind == SLIDING else None,
        )


@dataclass(frozen=True)
class PromptScores:
    """A prompt's tokens 1..T-1 scored by the prefill: each token's log-probability under the logits computed
    from the tokens before it (T-1,), and the k most likely tokens there, log-probabilities and ids (T-1, k)."""

    logprobs: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor


@dataclass
class PrefillBatch:
    """New rows (slots ``slots``) with prompts ``prompts``; tokens are packed in that order. ``prompt_logprobs``:
    per row, None, or k to score that row's prompt (``scores[row]``, filled by ModelRunner.prefill)."""

    slots: list[int]
    prompts: list[list[int]]
    prompt_logprobs: list[int | None] | None = None
    scores: dict[int, PromptScores] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: nn.Module, spec: ModelSpec, cache: KVCache, rows: RowAdapters) -> None:
        self.model, self.spec, self.cache, self.rows = model, spec, cache, rows
        self.config = model.config
        self.decoder = model.model
        layers = list(self.decoder.layers)
        family = layer_map(model)
        self.layers = [_Layer.of(layer, i, family, self.config) for i, layer in enumerate(layers)]
        self.linears = [{name: layer.get_submodule(path) for name, path in spec.module_paths.items()} for layer in layers]
        attn = layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_kv = self.config.num_key_value_heads
        self.group = self.config.num_attention_heads // self.n_kv
        self.act = mlp_activation(layers[0].mlp)
        check_rotary(self.decoder.rotary_emb, family.layer_types)
        self.ropes = list(dict.fromkeys(layer.rope for layer in self.layers))
        self.window = next((layer.window for layer in self.layers if layer.window is not None), None)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    # ---------------------------------------------------------------------------------------- shared pieces

    def _rope(self, positions: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) (N, head_dim) of each layer type (one entry, None, for a single RoPE)."""
        x = self.decoder.embed_tokens.weight[:1]  # only its dtype and device matter
        ropes = {}
        for kind in self.ropes:
            cos, sin = rotary_cos_sin(self.decoder.rotary_emb, x, positions.unsqueeze(0), kind)
            ropes[kind] = cos[0], sin[0]
        return ropes

    def _linear(self, layer: int, module: str, x: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        if ("in", module) in ctx.points:
            x = ctx.scale(layer, ("in", module), x, inplace=False)  # x may be another module's input too
        linear = self.linears[layer][module]
        y = F.linear(x, linear.weight, linear.bias)
        if module in ctx.lora:
            y = y + ctx.lora_delta(layer, module, x)
        if ("out", module) in ctx.points:
            y = ctx.scale(layer, ("out", module), y, inplace=True)  # y is this call's own tensor
        return y

    def _forward(self, tokens: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        x = self.decoder.embed_tokens(tokens)  # Gemma's embedding module scales by sqrt(hidden_size) itself
        attend = self._attend_prefill if ctx.prefill is not None else self._attend_decode
        for i, layer in enumerate(self.layers):
            normed = layer.input_norm(x)
            if ctx.prefill is not None:
                self._run_generators(i, x, normed, ctx)
            q = self._linear(i, "q", normed, ctx)
            k = self._linear(i, "k", normed, ctx)
            v = self._linear(i, "v", normed, ctx)
            a = self._linear(i, "o", attend(i, q, k, v, ctx), ctx)
            x = x + (a if layer.attn_out_norm is None else layer.attn_out_norm(a))
            h = layer.mlp_in_norm(x)
            m = self._linear(i, "down", self.act(self._linear(i, "gate", h, ctx)) * self._linear(i, "up", h, ctx), ctx)
            x = x + (m if layer.mlp_out_norm is None else layer.mlp_out_norm(m))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.decoder.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

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
        ctx.rope = self._rope(positions)
        if self.window is not None and width > self.window:  # the sliding layers' causal band, any prompt's top-left
            ctx.band = (steps[None, :] <= steps[:, None]) & (steps[None, :] > steps[:, None] - self.window)
        hidden = self._forward(tokens, ctx)
        for slot, n in zip(batch.slots, lengths):
            self.cache.lengths[slot] = n
        for row, k in enumerate(batch.prompt_logprobs or ()):
            if k is not None:
                start, end = segments[row]
                batch.scores[row] = self._score_prompt(hidden[start : end - 1], batch.prompts[row][1:], k)
        return self._logits(hidden[[end - 1 for end in ends]])

    def _score_prompt(self, hidden: torch.Tensor, targets: list[int], k: int) -> PromptScores:
        """``targets`` (each prompt token after the first) scored under the logits of the positions before them
        (``hidden``), a chunk of positions at a time so no (prompt, vocab) tensor is ever held whole."""
        ids = torch.tensor(targets, dtype=torch.long)
        parts = [
            ranked(self._logits(hidden[a : a + PROMPT_LOGPROB_CHUNK]), ids[a : a + PROMPT_LOGPROB_CHUNK], k)
            for a in range(0, len(targets), PROMPT_LOGPROB_CHUNK)
        ]
        if not parts:  # a one-token prompt: nothing to score
            return PromptScores(torch.empty(0), torch.empty(0, k), torch.empty(0, k, dtype=torch.long))
        return PromptScores(*(torch.cat(p) for p in zip(*parts)))

    def _attend_prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        parts = self.layers[layer]
        cos, sin = ctx.rope[parts.rope]
        q = q.view(-1, self.n_kv * self.group, self.head_dim).transpose(0, 1)  # (H, N, hd)
        k = k.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        v = v.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        if parts.q_norm is not None:
            q, k = parts.q_norm(q), parts.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty_like(q)
        for slot, (start, end) in zip(ctx.prefill.slots, ctx.segments):
            ks, vs = k[:, start:end], v[:, start:end]
            self.cache.write_prompt(layer, slot, ks, vs)
            n = end - start
            band = ctx.band[:n, :n] if parts.window is not None and n > parts.window else None
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], ks[None], vs[None], attn_mask=band, is_causal=band is None, scale=self.scaling,
                enable_gqa=True,
            )[0]
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    # ---------------------------------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..B-1 (``tokens`` (B,)) -> next-token logits (B, vocab)."""
        batch = tokens.shape[0]
        lengths = self.cache.lengths[:batch]
        ctx = _Context(self.rows, torch.arange(batch), prefill=None, segments=None, lora_grouped=False)
        ctx.rope = self._rope(lengths)
        width = int(lengths.max()) + 1
        steps = torch.arange(width)
        ctx.masks = {None: (steps <= lengths[:, None]).view(batch, 1, 1, width)}
        if self.window is not None:
            ctx.masks[self.window] = ctx.masks[None] & (steps > lengths[:, None] - self.window).view(batch, 1, 1, width)
        hidden = self._forward(tokens, ctx)
        self.cache.lengths[:batch] += 1
        return self._logits(hidden)

    def _attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        batch = q.shape[0]
        parts = self.layers[layer]
        cos, sin = ctx.rope[parts.rope]
        # query heads grouped onto their KV head: (B, kv_heads, group, hd) attends (B, kv_heads, W, hd)
        q = q.view(batch, self.n_kv, self.group, self.head_dim)
        k = k.view(batch, self.n_kv, self.head_dim)
        if parts.q_norm is not None:
            q, k = parts.q_norm(q), parts.k_norm(k)
        q = q * cos[:, None, None] + rotate_half(q) * sin[:, None, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        self.cache.write_step(layer, k, v.view(batch, self.n_kv, self.head_dim))
        mask = ctx.masks[parts.window]
        keys, values = self.cache.view(layer, batch, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
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
        self.rope: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}  # layer type -> (cos, sin)
        self.masks: dict[int | None, torch.Tensor] = {}  # decode: window (None: global) -> (B, 1, 1, W) mask
        self.band: torch.Tensor | None = None  # prefill: sliding layers' (T_max, T_max) causal-and-window mask
        self.pad_index: torch.Tensor | None = None  # prefill: (rows, T_max) packed-token index of each prompt
        self.pad_mask: torch.Tensor | None = None

    def scale(self, layer: int, point: tuple[str, str], x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``x`` scaled by each row's 1 + z at ``point``, as x + x * z in one kernel (pedro.layer.apply_scale: exact
        in bf16 for small z, where 1 + z would not be). Decode: one addcmul with a slice of the table (row i is
        slot i). Prefill: one per prompt segment with its row's vector -- a per-token gather of the table would
        copy a (tokens, width) tensor per point per layer, which cost ~15 % of a 32-prompt prefill. ``inplace``:
        ``x`` may be overwritten (it is no other computation's input)."""
        table = self.rows.scales[point][layer]
        out = x if inplace else torch.empty_like(x)
        if self.contiguous:
            return torch.addcmul(x, x, table[: x.shape[0]], out=out)
        for slot, (start, end) in zip(self.prefill.slots, self.segments):
            torch.addcmul(x[start:end], x[start:end], table[slot], out=out[start:end])
        return out

    def lora_delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        if self.lora_grouped:
            return self.rows.lora_delta_grouped(layer, module, x, self.lora_rows)
        return self.rows.lora_delta(layer, module, x, self.lora_rows)

