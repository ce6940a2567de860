"""The engine's model runner: the LLaMA-family and Gemma 3 decoder forward over the engine's own KV cache.

It reuses the backbone's modules and weights (embeddings, RMSNorms, rotary embedding, linear layers) and
re-implements only the glue that transformers' generic forward spends per-step Python and copies on: the
cache (pre-allocated slots instead of growing tensors), GQA (query heads grouped onto their KV head instead
of repeating K/V), masks (one per-row length mask per step, and its windowed copy for sliding layers) and
per-row adapters (rows.py).

Prefill packs the new prompts into one (tokens, d) matrix: every linear layer is one GEMM over all of them,
attention runs per prompt on the CPU (causal, banded on sliding layers, no padding) and as one padded batch on
an accelerator (where each call is a launch), and each PEDRO row's generators pool that row's states at each
layer -- pedro.generator.VectorGenerator itself, the same code the PEFT model runs.

One forward serves every family: its ``pedro.backbones.LayerMap`` says what its decoder layer adds to LLaMA's (Gemma 3:
QK-norm, sandwich norms, sliding-window and global layers with their own RoPE), and each layer's pieces are
resolved once at construction, so a LLaMA step pays only a few ``is None`` checks for the features it lacks
(measured: no difference in a step's time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pedro.backbones import LAYER_MAPS, LayerMap, layer_map
from pedro.compat import (
    apply_rope,
    can_pack_linear,
    check_rotary,
    mlp_activation,
    packed_linear,
    rms_norm,
    rope_sin,
    rotary_cos_sin,
)
from pedro.engine import cpu_kernels
from pedro.engine.adapters import ModelSpec, PedroWeights
from pedro.engine.device import upload
from pedro.engine.kv_cache import KVCache
from pedro.engine.rows import Point, RowAdapters
from pedro.engine.sampling import ranked
from pedro.engine.vectors import PedroBatch, batch_rows, generate_vectors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pedro.engine.decode_graphs import DecodeGraphs

# the most a prefill's per-token LoRA form may gather (each token's A and B, per module and layer); a larger
# prefill groups its tokens by adapter instead
LORA_GATHER_BYTES = 256 * 2**20
# an accelerator's prefill of whole prompts runs attention as one padded batch when the padding at most
# doubles the tokens attention reads (one long prompt among short ones: per prompt, as on the CPU)
PADDED_PREFILL_SLACK = 2
PROMPT_LOGPROB_CHUNK = 256  # prompt positions per log-softmax: bounds the (positions, vocab) float32 temporary


SLIDING = "sliding_attention"
_Ropes = dict[str | None, tuple[torch.Tensor, torch.Tensor]]  # layer type (None: the one RoPE) -> (cos, sin)
_Parts = list[tuple[slice, "_Context"]]  # a forward's rows: a decode step's and/or a prefill's, each with its context


def check_supported(model: PreTrainedModel, max_seq_len: int) -> None:
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
    uses_window = not family.layer_types and getattr(config, "use_sliding_window", config.model_type == "mistral")
    if uses_window and window is not None and window < max_seq_len:
        raise ValueError(f"sliding-window attention ({window}) shorter than max_seq_len {max_seq_len} is not supported")


_Norm = Callable[[torch.Tensor], torch.Tensor]  # a backbone's norm as the forward calls it (compat.rms_norm)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the forward runs it: its norms (None where the family has none) and attention type."""

    input_norm: _Norm
    qk_norms: tuple[_Norm, _Norm] | None  # on the query and key heads
    attn_out_norm: _Norm | None
    mlp_in_norm: _Norm
    mlp_out_norm: _Norm | None
    rope: str | None  # key of this layer's (cos, sin): its layer type, None for one RoPE for all layers
    window: int | None  # sliding window (keys within ``window`` positions, itself included) or None: global

    @classmethod
    def of(
        cls, layer: nn.Module, index: int, family: LayerMap, config: Any, norm_of: Callable[[nn.Module], _Norm]
    ) -> "_Layer":
        kind: str | None = config.layer_types[index] if family.layer_types else None
        window: int | None = config.sliding_window if kind == SLIDING else None

        def norm(path: str) -> _Norm:
            return norm_of(layer.get_submodule(path))

        sandwich = family.sandwich_norms
        return cls(
            input_norm=norm("input_layernorm"),
            qk_norms=(norm("self_attn.q_norm"), norm("self_attn.k_norm")) if family.qk_norm else None,
            attn_out_norm=norm("post_attention_layernorm") if sandwich else None,
            mlp_in_norm=norm("pre_feedforward_layernorm") if sandwich else norm("post_attention_layernorm"),
            mlp_out_norm=norm("post_feedforward_layernorm") if sandwich else None,
            rope=kind,
            window=window,
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
    starts: list[int] | None = None  # per row, the position of its first token here (None: all 0, whole prompts)


@dataclass
class LayeredPrefill:
    """A prompt prefilled layer by layer across engine steps (``ModelRunner.prefill_layers``), each step's piece
    a run of token-layers: layers ``done``, ``done`` + 1, ... in turn, within a layer its positions in order. A
    PEDRO layer's vectors need the whole prompt's states entering that layer, so a layer's positions can only
    start once the layer before has all of them; split this way, the prompt still bounds the time one step
    spends on it."""

    slot: int
    prompt: list[int]
    prompt_logprobs: int | None = None
    done: int = 0  # layers every position has been through
    position: int = 0  # positions of layer ``done`` run so far
    hidden: torch.Tensor | None = None  # the states entering layer ``done``, every position
    next_hidden: torch.Tensor | None = None  # those leaving it, positions [0, position)
    scores: PromptScores | None = None


def _gemm(
    weight: torch.Tensor, bias: torch.Tensor | None, rows: int, exact: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer's product as the runner computes it: on the CPU with the weight packed once for the GEMM
    kernel (pedro.compat.packed_linear: the same numbers; bf16 1.3-2.2x faster at any row count, fp32
    1.2-1.9x for a step of ``rows`` rows, the engine's full batch; not ``exact``: fp32 through oneDNN,
    batch-invariant, within rounding), anything else as ``F.linear``."""
    if can_pack_linear(weight, exact):
        return packed_linear(weight, bias, rows, exact)
    return lambda x: F.linear(x, weight, bias)


def _plain(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, linear.weight, linear.bias)


@dataclass(frozen=True)
class _Fused:
    """Linear layers that read the same input run as one GEMM over their weights stacked (``gemm``); each
    module's output is then its column slice of the product (``slices``: (module, start, end))."""

    gemm: Callable[[torch.Tensor], torch.Tensor]
    slices: tuple[tuple[str, int, int], ...]


# the modules of a decoder layer that read the same input, fused into one GEMM where the layer allows it
FUSIONS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))


def _fuse(layer: nn.Module, spec: ModelSpec, rows: int, exact: bool = True) -> dict[tuple[str, ...], _Fused]:
    """This layer's FUSIONS whose modules are plain linear layers with biases alike -> their fused GEMMs."""
    fused: dict[tuple[str, ...], _Fused] = {}
    for group in FUSIONS:
        modules = [layer.get_submodule(spec.module_paths[m]) for m in group if m in spec.module_paths]
        linears = [m for m in modules if type(m) is nn.Linear]
        if len(linears) != len(group) or len({m.bias is None for m in linears}) != 1:
            continue
        weight = torch.cat([m.weight.detach() for m in linears])
        biases = [m.bias.detach() for m in linears if m.bias is not None]
        slices, end = [], 0
        for name, linear in zip(group, linears):
            slices.append((name, end, end + linear.out_features))
            end += linear.out_features
        fused[group] = _Fused(_gemm(weight, torch.cat(biases) if biases else None, rows, exact), tuple(slices))
    return fused


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        spec: ModelSpec,
        cache: KVCache,
        rows: RowAdapters,
        fuse: bool = False,
        exact_gemms: bool = True,
        kernels: bool = True,
    ) -> None:
        self.spec, self.cache, self.rows = spec, cache, rows
        # transformers types a model's own modules and config fields as Any: each is read once, here
        config, decoder = model.config, model.model
        layers = list(decoder.layers)
        family = layer_map(model)
        self.embed_tokens: nn.Embedding = decoder.embed_tokens  # Gemma's embedding scales by sqrt(hidden_size) itself
        self.device = self.embed_tokens.weight.device
        # in bf16 on a CPU, the engine's own kernels (cpu_kernels.py) where they build: decode and prefill
        # attention (RoPE and the cache writes included; probabilities kept in fp32), the norms, the gated
        # activation and PEDRO's per-row scaling, one pass each; in fp32, decode attention, the norms and the
        # activation
        on_cpu = kernels and self.device.type == "cpu"
        decode_kernel = on_cpu and cache.k.dtype in (torch.bfloat16, torch.float32)
        bf16_kernels = on_cpu and cache.k.dtype == torch.bfloat16

        def norm_of(module: nn.Module) -> _Norm:
            kernel = cpu_kernels.rms_norm(module) if on_cpu else None
            return kernel or rms_norm(module)

        self.layers = [_Layer.of(layer, i, family, config, norm_of) for i, layer in enumerate(layers)]
        self.final_norm = norm_of(decoder.norm)
        self.rotary_emb: nn.Module = decoder.rotary_emb
        attn = layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.n_kv: int = config.num_key_value_heads
        heads: int = config.num_attention_heads
        self.group = heads // self.n_kv
        act = mlp_activation(layers[0].mlp)
        self.gate_kernel = cpu_kernels.silu_mul(act, cache.k.dtype) if on_cpu else None
        self.gated: cpu_kernels.GatedActivation = self.gate_kernel or (lambda g, u: act(g) * u)
        check_rotary(self.rotary_emb, family.layer_types)
        self.ropes = list(dict.fromkeys(layer.rope for layer in self.layers))
        self.window = next((layer.window for layer in self.layers if layer.window is not None), None)
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        # an accelerator's steps are bound by kernel launches: per-row scales gathered per token (one op per
        # point, not one per prompt: _Context.scale), LoRA per token (BGMV) rather than per adapter
        self.launch_bound = self.device.type != "cpu"
        # without the decode kernel (a head size it does not serve), a decode step's attention, one query per row,
        # as two batched matmuls and a softmax on a CPU in fp32: the CPU's flash kernel pays its blocking for
        # nothing at one query (batch 32 x 140 keys, 2 threads: 1.23 ms against 0.69 ms a layer). Not in bf16,
        # where the scores would round to bf16 (the flash kernel keeps them in fp32), nor on an accelerator, whose
        # fused kernels do better
        self.matmul_decode_attention = self.device.type == "cpu" and cache.k.dtype == torch.float32
        self.exact_alpha = math.frexp(self.scaling)[0] == 0.5  # a power of two: scaling a product is exact
        shapes = self.head_dim in cpu_kernels.HEAD_DIMS and self.group <= cpu_kernels.MAX_GROUP
        self.scale_kernel = cpu_kernels.scale_rows() if bf16_kernels else None
        self.attention_kernel = cpu_kernels.decode_attention() if decode_kernel and shapes else None
        self.prefill_kernel = cpu_kernels.prefill_attention() if bf16_kernels and shapes else None
        # PEDRO's scaling of q and v applied by the attention kernels as they read them, of up by the gated
        # activation's: no pass of its own over those outputs (90 calls a decode step on SmolLM2). Not q where
        # a norm comes between the projection and the kernel (q/k norms)
        self.kernel_points: frozenset[Point] = frozenset()
        if self.scale_kernel is not None:
            attended = [("out", "v")] + ([("out", "q")] if all(x.qk_norms is None for x in self.layers) else [])
            self.kernel_points = frozenset(
                (attended if self.attention_kernel is not None else [])
                + ([("out", "up")] if self.gate_kernel is not None else [])
            )
        # each linear layer's product (and the LM head's), packed for a decode step's rows where that pays; with
        # ``fuse``, q/k/v and gate/up one GEMM each, their own products kept for a step that scales their inputs
        # apart (the engine fuses on an accelerator, in bf16 on a CPU and in fp32 on its oneDNN path: docs/engine.md)
        rows_hint = cache.slots
        self.fused = [_fuse(layer, spec, rows_hint, exact_gemms) if fuse else {} for layer in layers]
        self.gemms = [
            {
                name: _plain(layer.get_submodule(path))
                if any(name in group for group in fused)
                else _gemm(layer.get_submodule(path).weight, layer.get_submodule(path).bias, rows_hint, exact_gemms)
                for name, path in spec.module_paths.items()
            }
            for layer, fused in zip(layers, self.fused)
        ]
        self.head_gemm = _gemm(model.lm_head.weight, model.lm_head.bias, rows_hint, exact_gemms)
        self.graphs: DecodeGraphs | None = None  # set by the engine to replay decode steps (decode_graphs.py)

    # ---------------------------------------------------------------------------------------- shared pieces

    def _rope(self, positions: torch.Tensor) -> _Ropes:
        """(cos, sin) (N, head_dim) of each layer type (one entry, None, for a single RoPE), sin as
        ``apply_rope`` reads it (``rope_sin``)."""
        x = self.embed_tokens.weight[:1]  # only its dtype and device matter
        ropes = {}
        for kind in self.ropes:
            cos, sin = rotary_cos_sin(self.rotary_emb, x, positions.unsqueeze(0), kind)
            ropes[kind] = cos[0], rope_sin(sin[0])
        return ropes

    def _linear(
        self, layer: int, module: str, x: torch.Tensor, parts: "_Parts", later: "_Later | None" = None
    ) -> torch.Tensor:
        """One GEMM over every row of the forward; each part's adapters then act on its own rows."""
        point = ("in", module)
        if any(point in ctx.points for _, ctx in parts):
            scaled = torch.empty_like(x)  # x may be another module's input too
            for rows, ctx in parts:
                if point in ctx.points:
                    ctx.scale(layer, point, x[rows], out=scaled[rows])
                else:
                    scaled[rows] = x[rows]
            x = scaled
        return self._adapt(layer, module, x, self.gemms[layer][module](x), parts, later)

    def _adapt(
        self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor, parts: "_Parts", later: "_Later | None" = None
    ) -> torch.Tensor:
        """``module``'s product ``y`` of ``x``, each part's LoRA deltas and output scales applied to its rows, in
        place (y is this forward's own tensor, or its own column slice of a fused product); the scales of the
        points in ``later`` are left to the kernel that reads y next."""
        whole = len(parts) == 1  # one part: its rows are all of y, used without a view per op
        for rows, ctx in parts:
            x_rows, y_rows = (x, y) if whole else (x[rows], y[rows])
            if module in ctx.lora:
                y_rows += ctx.lora_delta(layer, module, x_rows)
            if ("out", module) in ctx.points and (later is None or ("out", module) not in later.points):
                ctx.scale(layer, ("out", module), y_rows)
        return y

    def _projections(
        self, layer: int, modules: tuple[str, ...], x: torch.Tensor, parts: "_Parts", later: "_Later | None" = None
    ) -> list[torch.Tensor]:
        """The products of ``modules``, which read the same input ``x``: one fused GEMM, each module's output its
        column slice, unless a part scales one of their inputs (then each module's own GEMM of its own input)."""
        fused = self.fused[layer].get(modules)
        if fused is None or any(("in", m) in ctx.points for m in modules for _, ctx in parts):
            return [self._linear(layer, m, x, parts, later) for m in modules]
        y = fused.gemm(x)
        return [self._adapt(layer, m, x, y[:, start:end], parts, later) for m, start, end in fused.slices]

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: "_Parts", later: "_Later | None"
    ) -> torch.Tensor:
        outs = []
        for rows, ctx in parts:
            scales = later.attention(layer, ctx) if later is not None else {}
            if isinstance(ctx.step, _Prefill):
                outs.append(self._attend_prefill(layer, q[rows], k[rows], v[rows], ctx.rope, ctx.step, scales))
            else:
                outs.append(self._attend_decode(layer, q[rows], k[rows], v[rows], ctx.rope, ctx.step, scales))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(self, x: torch.Tensor, parts: "_Parts", layers: range, generators: bool = True) -> torch.Tensor:
        """The hidden states ``x`` entering the first of ``layers`` -> those leaving the last. ``parts``: which
        rows of ``x`` are a decode step's and which a prefill's, each with its context; every linear layer reads
        the weights once for all of them. ``generators``: a prefill's PEDRO generators pool its rows' states at
        each layer (False: their vectors were written already, from the whole prompt)."""
        later = _Later.of(self.kernel_points, parts)
        for i in layers:
            layer = self.layers[i]
            normed = layer.input_norm(x)
            for rows, ctx in parts:
                if generators and isinstance(ctx.step, _Prefill):
                    self._run_generators(i, x[rows], normed[rows], ctx.step)
            q, k, v = self._projections(i, ("q", "k", "v"), normed, parts, later)
            a = self._linear(i, "o", self._attend(i, q, k, v, parts, later), parts)
            x = x + (a if layer.attn_out_norm is None else layer.attn_out_norm(a))
            h = layer.mlp_in_norm(x)
            gate, up = self._projections(i, ("gate", "up"), h, parts, later)
            if later is not None and ("out", "up") in later.points:
                assert self.gate_kernel is not None, "up's scaling is left only to the gate kernel"
                act = self.gate_kernel(gate, up, *later.table(i, ("out", "up")))
            else:
                act = self.gated(gate, up)
            m = self._linear(i, "down", act, parts)
            x = x + (m if layer.mlp_out_norm is None else layer.mlp_out_norm(m))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head_gemm(self.final_norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    # ---------------------------------------------------------------------------------------- prefill

    def _run_generators(self, layer: int, raw: torch.Tensor, normed: torch.Tensor, prefill: "_Prefill") -> None:
        """Each PEDRO row's generator for this layer pools that row's prompt states (prefill only)."""
        for batch in prefill.pedro_batches:
            weights = batch.groups[0].weights  # every group of a batch adapts the same layers the same way
            if layer in weights.generators:
                z = generate_vectors(batch, layer, raw, normed, prefill.pad_index, prefill.pad_mask)
                self.rows.write_pedro(layer, batch.slots, z, weights.slices[layer])

    def _prefill_context(
        self, slots: list[int], prompts: list[list[int]], starts: list[int]
    ) -> tuple["_Context", torch.Tensor, list[tuple[int, int]]]:
        """A prefill forward's context for rows ``slots`` running ``prompts`` (their tokens from positions
        ``starts``), every index tensor built on the host and uploaded once -> (context, packed tokens, each
        row's [start, end) among them)."""
        lengths = [len(p) for p in prompts]
        ends, total = [], 0
        for n in lengths:
            total += n
            ends.append(total)
        segments = list(zip([0] + ends[:-1], ends))
        token_slots = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
        # an accelerator's per-token forms index by each token's slot, uploaded once
        live_lora = self.rows.live_lora()
        token_index = upload(token_slots, self.device) if self.launch_bound else None
        token_lora: torch.Tensor | None = None
        lora_groups: list[tuple[int, torch.Tensor]] = []
        if live_lora:
            if token_index is not None and len(token_slots) * self.rows.lora_gather_bytes() <= LORA_GATHER_BYTES:
                token_lora = self.rows.lora_index.index_select(0, token_index)
            else:
                lora_groups = [(i, upload(where, self.device)) for i, where in self.rows.lora_groups(token_slots)]
        pedro_rows = []
        for row, slot in enumerate(slots):
            entry = self.rows.row_entry[slot]
            if entry is not None and isinstance(entry.weights, PedroWeights):
                pedro_rows.append((row, slot, entry.weights))
        width = max(lengths)
        steps = torch.arange(width)
        pad_mask = steps[None, :] < torch.tensor(lengths)[:, None]
        prefill = _Prefill(
            slots,
            starts,
            segments,
            lora_groups,
            token_lora,
            batch_rows(pedro_rows, [end - 1 for _, end in segments], self.device),
            pad_index=upload(
                torch.where(pad_mask, torch.tensor([a for a, _ in segments])[:, None] + steps, 0), self.device
            ),
            pad_mask=upload(pad_mask, self.device),
            token_index=token_index,
        )
        positions = upload([start + i for start, n in zip(starts, lengths) for i in range(n)], self.device)
        rope = self._rope(positions)
        padded_tokens = len(slots) * width
        if (
            token_index is not None
            and len(slots) > 1
            and not any(starts)
            and padded_tokens <= PADDED_PREFILL_SLACK * total
        ):
            prefill.padded = self._padded(prefill, token_index, positions)
        if self.prefill_kernel is not None:  # each row's slot, tokens and positions: the kernel needs no masks
            prefill.kernel_rows = torch.tensor(
                [[slot, first, n, start] for slot, (first, _), n, start in zip(slots, segments, lengths, starts)]
            )
        else:
            self._prefill_masks(prefill, starts, lengths)
        if self.scale_kernel is not None:
            prefill.slot_index = upload(token_slots, self.device)
        ctx = _Context(self.rows, token_slots, prefill, rope, self.scale_kernel)
        return ctx, upload([t for p in prompts for t in p], self.device), segments

    def _prefill_masks(self, prefill: "_Prefill", starts: list[int], lengths: list[int]) -> None:
        """The masks scaled_dot_product_attention needs beyond its causal one: the sliding layers' band where a
        prompt is longer than the window, and each later chunk's view of the positions cached before it."""
        width = max(lengths)
        if self.window is not None and width > self.window:  # the sliding layers' causal band, any prompt's top-left
            steps = torch.arange(width)
            prefill.band = upload(
                (steps[None, :] <= steps[:, None]) & (steps[None, :] > steps[:, None] - self.window), self.device
            )
        for row, (start, n) in enumerate(zip(starts, lengths)):
            if start:  # a chunk after cached positions: queries start..start+n-1 see keys 0..their own position
                query, key = torch.arange(start, start + n)[:, None], torch.arange(start + n)[None, :]
                causal = key <= query
                prefill.chunk_masks[row] = {None: upload(causal, self.device)}
                if self.window is not None:
                    prefill.chunk_masks[row][self.window] = upload(causal & (key > query - self.window), self.device)

    def _padded(self, prefill: "_Prefill", token_index: torch.Tensor, positions: torch.Tensor) -> "_Padded":
        """Whole prompts as one padded batch for attention: each packed token's place in the padded (rows * T)
        output. No mask beyond the causal one is needed: a real query at position t sees keys 0..t of its
        own prompt, which precede any padding; padding queries' outputs are dropped."""
        width = prefill.pad_index.shape[1]
        rows = upload(
            [row for row, (start, end) in enumerate(prefill.segments) for _ in range(end - start)], self.device
        )
        return _Padded(token_index, positions, rows * width + positions)

    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Run the prompts of new rows through every layer, fill their cache slots -> the logits after each row's
        last token here (n_rows, vocab). A row with a start > 0 is a chunk of its prompt after the positions its
        slot already holds (chunked prefill); such a row's prompt logprobs are not scored here."""
        logits = self.run(None, batch)[1]
        assert logits is not None
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..B-1 (``tokens`` (B,)) -> next-token logits (B, vocab). With decode
        graphs (decode_graphs.py) the step is padded to its batch and width buckets and replayed."""
        if self.graphs is None:
            logits = self.run(tokens, None)[0]
            assert logits is not None
            return logits
        logits = self.graphs.run(tokens)
        self.cache.lengths[: tokens.shape[0]] += 1
        return logits

    @torch.inference_mode()
    def decode_forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, rows_index: torch.Tensor, width: int
    ) -> torch.Tensor:
        """The decode forward on device tensors alone, for rows 0..B-1: ``tokens``, their positions ``lengths``
        and the cache slots ``rows_index`` their keys and values go to (B,); keys 0..width-1 attended.
        -> logits (B, vocab). The host's lengths are left to the caller: this is what a CUDA graph captures."""
        ctx = self._decode_context_of(lengths, rows_index, width)
        hidden = self._forward(self.embed_tokens(tokens), [(slice(0, None), ctx)], range(len(self.layers)))
        return self._logits(hidden)

    @torch.inference_mode()
    def run(
        self, tokens: torch.Tensor | None, batch: PrefillBatch | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step for rows 0..B-1 (``tokens`` (B,), or None) and a prefill of ``batch`` (or None) in one
        forward: each linear layer is one GEMM over the decoding rows and the prompt tokens together, so a step
        that admits or continues a prompt while rows decode reads the weights once, not twice. -> (decode
        logits (B, vocab) or None, prefill logits as ``prefill`` returns them or None)."""
        parts: _Parts = []
        ids = []
        width = 0
        if tokens is not None:
            width = tokens.shape[0]
            parts.append((slice(0, width), self._decode_context(width)))
            ids.append(tokens)
        segments: list[tuple[int, int]] = []
        if batch is not None:
            starts = batch.starts or [0] * len(batch.slots)
            ctx, prompt_tokens, segments = self._prefill_context(batch.slots, batch.prompts, starts)
            parts.append((slice(width, None), ctx))
            ids.append(prompt_tokens)
        hidden = self._forward(self.embed_tokens(torch.cat(ids)), parts, range(len(self.layers)))
        if tokens is not None:
            self.cache.lengths[:width] += 1
        if batch is None:
            return self._logits(hidden), None
        for slot, start, prompt in zip(batch.slots, starts, batch.prompts):
            self.cache.lengths[slot] = start + len(prompt)
        for row, k in enumerate(batch.prompt_logprobs or ()):
            if k is not None:
                start, end = segments[row]
                batch.scores[row] = self._score_prompt(
                    hidden[width + start : width + end - 1], batch.prompts[row][1:], k
                )
        last = list(range(width)) + [width + end - 1 for _, end in segments]
        logits = self._logits(hidden.index_select(0, upload(last, self.device)))
        return (logits[:width] if tokens is not None else None), logits[width:]

    @torch.inference_mode()
    def prefill_layers(self, state: LayeredPrefill, end: int) -> torch.Tensor | None:
        """Run ``state``'s prompt on to ``end`` token-layers (layer-major: layer l's tokens [a, b) are token-layers
        l * n + a to l * n + b for an n-token prompt), filling those layers and positions of its cache slot:
        whole layers with the whole prompt in one forward, the positions of a layer a piece starts or ends inside
        by themselves. A layer's PEDRO generators run once, over the whole prompt's states entering it, before
        its first positions; each later run of its positions attends the ones cached before them. -> None, or
        at the end the logits after the last token (1, vocab) (and ``state.scores`` when it asks for prompt
        logprobs)."""
        n, layers = len(state.prompt), len(self.layers)
        if state.hidden is None:  # the first piece: the states entering layer 0
            state.hidden = self.embed_tokens(upload(state.prompt, self.device))
        while state.done * n + state.position < end:
            layer, a = state.done, state.position
            if a == 0 and end >= (layer + 1) * n:  # whole layers
                last = min(layers, end // n)
                ctx, _, _ = self._prefill_context([state.slot], [state.prompt], [0])
                state.hidden = self._forward(state.hidden, [(slice(0, None), ctx)], range(layer, last))
                state.done = last
                continue
            if a == 0:  # the layer's vectors, from the whole prompt's states entering it, then its positions
                ctx, _, _ = self._prefill_context([state.slot], [state.prompt], [0])
                assert isinstance(ctx.step, _Prefill)
                self._run_generators(layer, state.hidden, self.layers[layer].input_norm(state.hidden), ctx.step)
                state.next_hidden = torch.empty_like(state.hidden)
            assert state.next_hidden is not None  # made at the layer's first positions
            b = min(n, end - layer * n)
            ctx, _, _ = self._prefill_context([state.slot], [state.prompt[a:b]], [a])
            state.next_hidden[a:b] = self._forward(
                state.hidden[a:b], [(slice(0, None), ctx)], range(layer, layer + 1), generators=False
            )
            state.position = b
            if b == n:
                state.hidden, state.next_hidden, state.done, state.position = state.next_hidden, None, layer + 1, 0
        self.cache.lengths[state.slot] = n  # every position of the layers begun: what moving the slot copies
        if state.done < layers:
            return None
        x, state.hidden = state.hidden, None
        if state.prompt_logprobs is not None:
            state.scores = self._score_prompt(x[:-1], state.prompt[1:], state.prompt_logprobs)
        return self._logits(x[-1:])

    def _score_prompt(self, hidden: torch.Tensor, targets: list[int], k: int) -> PromptScores:
        """``targets`` (each prompt token after the first) scored under the logits of the positions before them
        (``hidden``), a chunk of positions at a time so no (prompt, vocab) tensor is ever held whole."""
        ids = upload(targets, self.device)
        parts = [
            ranked(self._logits(hidden[a : a + PROMPT_LOGPROB_CHUNK]), ids[a : a + PROMPT_LOGPROB_CHUNK], k)
            for a in range(0, len(targets), PROMPT_LOGPROB_CHUNK)
        ]
        if not parts:  # a one-token prompt: nothing to score
            return PromptScores(
                *(
                    torch.empty(0, *shape, dtype=dtype, device=self.device)
                    for shape, dtype in (((), torch.float32), ((k,), torch.float32), ((k,), torch.long))
                )
            )
        return PromptScores(*(torch.cat(p) for p in zip(*parts)))

    def _attend_prefill(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: _Ropes,
        prefill: "_Prefill",
        scales: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        parts = self.layers[layer]
        cos, sin = rope[parts.rope]
        if self.prefill_kernel is not None and prefill.kernel_rows is not None:  # RoPE, cache writes, attention
            q, k, v = self._grouped(layer, q, k, v)
            out = self.prefill_kernel(
                q,
                k,
                v,
                cos.contiguous(),
                sin.contiguous(),
                self.cache.k[layer],
                self.cache.v[layer],
                prefill.kernel_rows,
                parts.window or 0,
                self.scaling,
                **scales,
            )
            return out.view(q.shape[0], -1)
        q = q.view(-1, self.n_kv * self.group, self.head_dim).transpose(0, 1)  # (H, N, hd)
        k = k.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        v = v.view(-1, self.n_kv, self.head_dim).transpose(0, 1)
        if parts.qk_norms is not None:
            q_norm, k_norm = parts.qk_norms
            q, k = q_norm(q), k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if prefill.padded is not None:
            return self._attend_padded(layer, q, k, v, prefill, prefill.padded)
        out = torch.empty_like(q)
        for row, (slot, offset, (start, end)) in enumerate(zip(prefill.slots, prefill.starts, prefill.segments)):
            ks, vs = k[:, start:end], v[:, start:end]
            self.cache.write_prompt(layer, slot, ks, vs, offset)
            n = end - start
            band: torch.Tensor | None = None  # None: causal
            if offset:  # a later chunk: its queries attend every cached position up to their own
                ks, vs = self.cache.k[layer, slot, :, : offset + n], self.cache.v[layer, slot, :, : offset + n]
                band = prefill.chunk_masks[row][parts.window]
            elif prefill.band is not None and parts.window is not None and n > parts.window:
                band = prefill.band[:n, :n]
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end],
                ks[None],
                vs[None],
                attn_mask=band,
                is_causal=band is None,
                scale=self.scaling,
                enable_gqa=True,
            )[0]
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    def _attend_padded(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefill: "_Prefill", padded: "_Padded"
    ) -> torch.Tensor:
        """Every prompt's attention in one call, over its tokens gathered into a padded (rows, heads, T, hd)
        batch, and every token's key and value written to its slot with one op each: on an accelerator, where
        a call per prompt per layer is a launch per prompt (the CPU spends no compute on padding instead)."""
        self.cache.write_step(layer, k.transpose(0, 1), v.transpose(0, 1), padded.slots, padded.positions)
        index = prefill.pad_index
        band = prefill.band if self.layers[layer].window is not None else None  # None: causal
        out = F.scaled_dot_product_attention(
            q[:, index].transpose(0, 1),
            k[:, index].transpose(0, 1),
            v[:, index].transpose(0, 1),
            attn_mask=band,
            is_causal=band is None,
            scale=self.scaling,
            enable_gqa=True,
        )  # (rows, heads, T, hd)
        rows, heads, width, head_dim = out.shape
        return out.transpose(1, 2).reshape(rows * width, heads * head_dim).index_select(0, padded.unpad)

    # ---------------------------------------------------------------------------------------- decode

    def _decode_context(self, batch: int) -> "_Context":
        """A decode step's context for rows 0..batch-1, each at its own length."""
        host_lengths = self.cache.lengths[:batch]
        width = int(host_lengths.max()) + 1  # host bookkeeping: no wait for the device
        lengths = upload(host_lengths, self.device)
        return self._decode_context_of(lengths, torch.arange(batch, device=self.device), width)

    def _decode_context_of(self, lengths: torch.Tensor, rows_index: torch.Tensor, width: int) -> "_Context":
        """A decode step's context for rows 0..B-1 from device tensors: each row's length (the position of its
        token) and the cache slot its key and value go to; keys 0..width-1 are read. Nothing here reads a value
        back to the host, so a CUDA graph can capture it (decode_graphs.py)."""
        batch = lengths.shape[0]
        masks: dict[int | None, torch.Tensor] = {}
        if self.attention_kernel is None:  # the kernel reads each row's own keys and needs no mask
            steps = torch.arange(width, device=self.device)
            masks[None] = (steps <= lengths[:, None]).view(batch, 1, 1, width)
            if self.window is not None:
                masks[self.window] = masks[None] & (steps > lengths[:, None] - self.window).view(batch, 1, 1, width)
        if self.matmul_decode_attention:  # added to the scores: 0 where a key is attended, -inf where not
            masks = {
                w: m.new_zeros(m.shape, dtype=self.cache.k.dtype)
                .masked_fill_(~m, float("-inf"))
                .expand(batch, self.n_kv, 1, width)
                .reshape(batch * self.n_kv, 1, width)
                for w, m in masks.items()
            }
        decode = _Decode(rows_index, lengths, masks, self.rows.lora_index[:batch])
        return _Context(self.rows, range(batch), decode, self._rope(lengths), self.scale_kernel)

    def _grouped(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows' q, k, v as (rows, kv_heads, group, hd) and (rows, kv_heads, hd), q/k norms applied: each query head
        beside its KV head, what the kernels (and a decode step's batched attention) read."""
        q = q.view(-1, self.n_kv, self.group, self.head_dim)
        k = k.view(-1, self.n_kv, self.head_dim)
        norms = self.layers[layer].qk_norms
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        return q, k, v.view(-1, self.n_kv, self.head_dim)

    def _attend_decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: _Ropes,
        decode: "_Decode",
        scales: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        batch = q.shape[0]
        parts = self.layers[layer]
        cos, sin = rope[parts.rope]
        # query heads grouped onto their KV head: (B, kv_heads, group, hd) attends (B, kv_heads, W, hd)
        q, k, v = self._grouped(layer, q, k, v)
        if self.attention_kernel is not None:  # RoPE, the cache writes and each row's attention in one call
            out = self.attention_kernel(
                q,
                k,
                v,
                cos.contiguous(),
                sin.contiguous(),
                self.cache.k[layer],
                self.cache.v[layer],
                decode.rows_index,
                decode.positions,
                parts.window or 0,
                self.scaling,
                **scales,
            )
            return out.reshape(batch, -1)
        q = apply_rope(q, cos[:, None, None], sin[:, None, None])
        k = apply_rope(k, cos[:, None], sin[:, None])
        self.cache.write_step(layer, k, v, decode.rows_index, decode.positions)
        mask = decode.masks[parts.window]
        keys, values = self.cache.view(layer, batch, mask.shape[-1])
        if self.matmul_decode_attention:  # mask: (B * kv_heads, 1, W), added to the scores
            # (B * kv_heads, group, hd) x (B * kv_heads, hd, W): the cache views' first two dimensions merge
            # without a copy; a power-of-two scale is exact on the products, so it rides on baddbmm's alpha
            width = mask.shape[-1]
            q3 = q.reshape(batch * self.n_kv, self.group, self.head_dim)
            alpha = self.scaling if self.exact_alpha else 1.0
            scores = torch.baddbmm(
                mask,
                q3 if self.exact_alpha else q3 * self.scaling,
                keys.reshape(-1, width, self.head_dim).transpose(1, 2),
                alpha=alpha,
            )  # every row keeps its own token's key: never all masked
            out = torch.bmm(torch.softmax(scores, -1), values.reshape(-1, width, self.head_dim))
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        return out.reshape(batch, -1)


@dataclass
class _Prefill:
    """A prefill forward's rows: slots ``slots``, their tokens packed in that order (``segments``: each row's
    [start, end) among them), each row's first token at position ``starts[row]`` of its prompt; and the index
    tensors built for them on the host and uploaded once."""

    slots: list[int]
    starts: list[int]
    segments: list[tuple[int, int]]
    lora_groups: list[tuple[int, torch.Tensor]]  # (resident LoRA index, its token positions)
    token_lora: torch.Tensor | None  # or each token's resident LoRA index, for the per-token (BGMV) form
    pedro_batches: list[PedroBatch]  # the PEDRO rows, by adapters whose generators run together
    pad_index: torch.Tensor  # (rows, T_max) packed-token index of each prompt
    pad_mask: torch.Tensor
    band: torch.Tensor | None = None  # sliding layers' (T_max, T_max) causal-and-window mask, if a prompt needs it
    chunk_masks: dict[int, dict[int | None, torch.Tensor]] = field(default_factory=dict)  # row -> window -> mask
    token_index: torch.Tensor | None = None  # each token's slot, on an accelerator (per-token forms)
    padded: "_Padded | None" = None  # there, a prefill of two or more whole prompts: attention as one batch
    slot_index: torch.Tensor | None = None  # each token's slot, for the CPU's row-scaling kernel
    kernel_rows: torch.Tensor | None = None  # (rows, 4) slot, first token, tokens, first position: the CPU's kernel


@dataclass
class _Later:
    """The scale points a forward's kernels apply as they read the outputs they scale (``ModelRunner.
    kernel_points`` that are live), and each row's table row: decode rows their own, prefill tokens their slot's,
    in the forward's row order."""

    points: frozenset[Point]
    rows: RowAdapters
    index: torch.Tensor

    @staticmethod
    def of(kernel_points: frozenset[Point], parts: "_Parts") -> "_Later | None":
        first = parts[0][1]  # every context of a forward has the same live points and kernels
        points = kernel_points & first.points
        if not points or first.scale_kernel is None:
            return None
        indices = [ctx.table_index for _, ctx in parts]
        return _Later(points, first.rows, indices[0] if len(indices) == 1 else torch.cat(indices))

    def table(self, layer: int, point: Point) -> tuple[torch.Tensor, torch.Tensor]:
        """``point``'s table at ``layer`` and each row's index into it."""
        return self.rows.scales[point][layer], self.index

    def attention(self, layer: int, ctx: "_Context") -> dict[str, torch.Tensor]:
        """The attention kernel's scale arguments for one part of the forward (its own rows' indices)."""
        scales = {
            name: self.rows.scales[point][layer]
            for name, point in (("q_scale", ("out", "q")), ("v_scale", ("out", "v")))
            if point in self.points
        }
        if scales:
            scales["scale_index"] = ctx.table_index
        return scales


@dataclass
class _Padded:
    """A prefill's whole prompts as one padded batch (``ModelRunner._padded``): each packed token's slot and
    position (where its key and value go) and its row in the padded output, flattened (row * T + position)."""

    slots: torch.Tensor
    positions: torch.Tensor
    unpad: torch.Tensor


@dataclass
class _Decode:
    """A decode step's rows: row i is slot i, one token each."""

    rows_index: torch.Tensor  # arange(B) and the rows' lengths: where the step's K/V go
    positions: torch.Tensor
    # window (None: global) -> (B, 1, 1, W) mask (additive for the matmuls; empty where the kernel attends)
    masks: dict[int | None, torch.Tensor]
    lora_rows: torch.Tensor  # (B,) resident LoRA index of each row


class _Context:
    """What one forward needs besides the tokens: which rows each token belongs to, live adapter points, each
    layer type's RoPE, and what its prefill or decode step reads."""

    def __init__(
        self,
        rows: RowAdapters,
        token_slots: list[int] | range,
        step: _Prefill | _Decode,
        rope: _Ropes,
        scale_kernel: cpu_kernels.RowScale | None = None,
    ) -> None:
        self.rows, self.token_slots, self.step, self.rope = rows, token_slots, step, rope  # slots on the host
        self.points = rows.live_points()
        self.lora = rows.live_lora()
        self.scale_kernel = scale_kernel  # bf16 on a CPU: every row's scaling in one call (cpu_kernels.py)
        self.row_index = (
            torch.arange(len(token_slots), device=rows.device)
            if scale_kernel is not None and isinstance(step, _Decode) and self.points
            else None
        )
        # addcmul's operand in a decode step: rows 0..B-1 of each live point's table, one view per layer, made
        # once per step (the kernels index the tables themselves)
        self.decode_tables: dict[tuple[str, str], tuple[torch.Tensor, ...]] = (
            {point: rows.scales[point][:, : len(token_slots)].unbind(0) for point in self.points}
            if isinstance(step, _Decode) and scale_kernel is None
            else {}
        )

    @property
    def table_index(self) -> torch.Tensor:
        """Each row's row of the scale tables, for the kernels (made with the context when they are on)."""
        index = self.row_index if isinstance(self.step, _Decode) else self.step.slot_index
        assert index is not None, "made with the context when the kernels are on"
        return index

    def scale(self, layer: int, point: tuple[str, str], x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """``out`` (default: ``x`` itself, in place) = ``x`` scaled by each row's 1 + z at ``point``, as
        x + x * z in one kernel (pedro.layer.apply_scale: exact in bf16 for small z, where 1 + z would not be).
        Decode: one addcmul with the step's view of the table (row i is slot i). Prefill on the CPU: one per
        prompt segment with its row's vector -- a per-token gather of the table would copy a (tokens, width)
        tensor per point per layer, which cost ~15 % of a 32-prompt prefill there; on an accelerator
        (``token_index``) that gather, since there each per-segment op is a kernel launch. The same numbers
        either way."""
        if self.scale_kernel is not None:  # one call: each row reads its own row of the table (decode: row i, slot i)
            self.scale_kernel(x, self.rows.scales[point][layer], self.table_index, x if out is None else out)
            return
        if isinstance(self.step, _Decode):
            table = self.decode_tables[point][layer]
            if out is None:
                x.addcmul_(x, table)
            else:
                torch.addcmul(x, x, table, out=out)
            return
        table = self.rows.scales[point][layer]
        if self.step.token_index is not None:
            torch.addcmul(x, x, table.index_select(0, self.step.token_index), out=x if out is None else out)
            return
        for slot, (start, end) in zip(self.step.slots, self.step.segments):
            segment = x[start:end]
            if out is None:
                segment.addcmul_(segment, table[slot])
            else:
                torch.addcmul(segment, segment, table[slot], out=out[start:end])

    def lora_delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        """Decode: BGMV, each row's A and B gathered. Prefill: one pair of GEMMs per adapter among the tokens,
        or on an accelerator (``token_lora``) BGMV per token, a few launches instead of a few per adapter."""
        if isinstance(self.step, _Decode):
            return self.rows.lora_delta(layer, module, x, self.step.lora_rows)
        if self.step.token_lora is not None:
            return self.rows.lora_delta(layer, module, x, self.step.token_lora)
        return self.rows.lora_delta_grouped(layer, module, x, self.step.lora_groups)
