"""Every private or version-specific piece of transformers, PEFT and torch that pedro relies on, in one place.

The engine's runner re-implements the decoder forward with the backbone's own modules and computes its bf16 GEMMs
through torch's oneDNN ops, the PEFT tuner checks adapter files with PEFT's own key filters, and training drops a
stale GGUF marker and orders its batches through Trainer's private sampler hook. Each of those touches an internal that a library release may rename or reshape;
here each one is imported or checked once, and a release that changes it fails with a message naming the
symbol, the installed version and the tested range, instead of a model that computes something else. (PEFT's
method tables are handled the same way in ``pedro.peft_method``.)
"""

from __future__ import annotations

import importlib.metadata
import inspect
from itertools import repeat
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torch.utils.data import Dataset, Sampler
    from transformers import Trainer

    # the mixin below is checked as the Trainer subclass it becomes; at run time it must not import the training
    # stack (the engine imports this module)
    _TrainerBase = Trainer
else:
    _TrainerBase = object

__all__ = [
    "TESTED",
    "IncompatibleLibrary",
    "OwnTrainSampler",
    "adapter_state_dict",
    "apply_rope",
    "can_pack_linear",
    "check_rotary",
    "forget_gguf_quantization",
    "incompatible",
    "mlp_activation",
    "norm_probe",
    "packed_linear",
    "rms_norm",
    "rms_norm_form",
    "rope_sin",
    "rotary_cos_sin",
    "rotate_half",
    "token_bytes",
]

TESTED = {"transformers": ">=5.0,<5.24", "peft": ">=0.21,<0.22"}


class IncompatibleLibrary(ImportError):
    """An installed transformers or PEFT release lacks, or reshaped, an internal that pedro uses."""


def incompatible(library: str, what: str) -> IncompatibleLibrary:
    """The error for ``library`` no longer providing ``what``: names the installed version and the tested one."""
    version = importlib.metadata.version(library)
    return IncompatibleLibrary(
        f"{library} {version} changed {what}, which pedro-peft relies on; it is tested with {library}{TESTED[library]}: "
        f"pip install '{library}{TESTED[library]}'"
    )


try:  # RoPE's half-split rotation, as every supported family applies it
    from transformers.models.llama.modeling_llama import rotate_half
except ImportError as err:
    raise incompatible("transformers", "transformers.models.llama.modeling_llama.rotate_half") from err

try:  # the keys a tuner's adapter owns in a model's state dict
    from peft.tuners.tuners_utils import (
        _filter_state_dict_by_key_prefixes,
        _get_tuner_state_dict_key_prefixes,
    )
except ImportError as err:
    raise incompatible(
        "peft", "peft.tuners.tuners_utils._filter_state_dict_by_key_prefixes / _get_tuner_state_dict_key_prefixes"
    ) from err


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s state dict that belong to adapter ``adapter_name``, under the keys PEFT
    expects in a loaded file: what a saved adapter must match exactly."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)


class OwnTrainSampler(_TrainerBase):
    """Mixin for a ``transformers.Trainer`` subclass whose ``train_sampler`` picks the training batches' order:
    no public argument of Trainer takes a sampler, it asks its private ``_get_train_sampler`` for one. Put it
    before Trainer in the bases; defining the subclass fails if that hook is gone or reshaped."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = getattr(super(OwnTrainSampler, cls), "_get_train_sampler", None)
        if hook is None or list(inspect.signature(hook).parameters)[1:2] != ["train_dataset"]:
            raise incompatible("transformers", "Trainer._get_train_sampler(train_dataset), where it takes its sampler")

    def train_sampler(self, dataset: Any) -> Sampler[int] | None:
        """The sampler over ``dataset`` (the training set as Trainer was given it); None keeps Trainer's own."""
        return None

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.train_sampler(dataset) if dataset is not None else None
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)


def check_rotary(rotary_emb: nn.Module, per_layer_type: bool) -> None:
    """Refuse a rotary embedding whose forward does not take what ``rotary_cos_sin`` passes: (x, position_ids),
    plus the layer type for a backbone with one RoPE per layer type (Gemma 3)."""
    params = list(inspect.signature(rotary_emb.forward).parameters)
    wanted = ["x", "position_ids", *(["layer_type"] if per_layer_type else [])]
    if params[: len(wanted)] != wanted:
        raise incompatible(
            "transformers", f"{type(rotary_emb).__name__}.forward's signature (expected {wanted}, got {params})"
        )


def rotary_cos_sin(
    rotary_emb: nn.Module, x: torch.Tensor, positions: torch.Tensor, layer_type: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of ``positions`` (1, N) from the backbone's own rotary embedding; ``layer_type`` selects the
    RoPE of that layer type, None for a backbone with one RoPE. ``x`` only gives the dtype and device."""
    return rotary_emb(x, positions, *(() if layer_type is None else (layer_type,)))


def rope_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` as ``apply_rope`` reads it. ``rotate_half`` is a roll by half the head with the first half
    negated, so ``rotate_half(x) * sin`` is ``x.roll(half) * rotate_half(sin.roll(half))`` bit for bit (a
    negation is exact, wherever it is applied): made once per step, it serves every layer."""
    return rotate_half(sin.roll(sin.shape[-1] // 2, -1))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, rolled_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit, given ``rolled_sin = rope_sin(sin)``: one
    roll where ``rotate_half`` takes two slices, a negation and a concatenation (about half the time of a
    decode step's RoPE at 32 rows on a CPU, where each small op costs its dispatch)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * rolled_sin


def rms_norm_form(norm: nn.Module) -> tuple[str, torch.Tensor, float] | None:
    """Which of the two RMSNorm forms transformers' supported families use ``norm`` is, read off the module:
    ("llama", weight, eps) for ``weight * normed.to(dtype)``, ("gemma", 1 + weight in fp32, eps) for
    ``(normed * (1 + weight)).to(dtype)``; None for a module of another form."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    eps_llama, eps_gemma = getattr(norm, "variance_epsilon", None), getattr(norm, "eps", None)
    if isinstance(eps_llama, float):
        return "llama", weight, eps_llama
    if isinstance(eps_gemma, float) and type(norm).__name__.startswith("Gemma"):
        return "gemma", 1.0 + weight.detach().float(), eps_gemma
    return None


def rms_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm``'s forward as a plain function of the same ops, for the two RMSNorm forms (``rms_norm_form``; the
    ``1 + weight`` of Gemma's made once): a module call and its dtype round trips cost ~30 us of a ~55 us norm
    at a decode step's 32 rows, ~2 ms of a step over SmolLM2's 61 norms. Checked bit for bit against ``norm`` on
    random inputs here; a module of another form, or one that disagrees, is returned as it is (the same
    numbers)."""
    form = rms_norm_form(norm)
    if form is None:
        return norm
    kind, weight, eps = form
    if kind == "llama":

        def fn(x: torch.Tensor) -> torch.Tensor:
            h = x.to(torch.float32)
            return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    else:

        def fn(x: torch.Tensor) -> torch.Tensor:
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight).type_as(x)

    if weight.device.type == "meta":  # no values to check it on
        return norm
    with torch.no_grad():
        return fn if torch.equal(fn(x := norm_probe(weight)), norm(x)) else norm


def norm_probe(weight: torch.Tensor) -> torch.Tensor:
    """Random rows for checking a norm of ``weight``'s width, in its dtype and on its device (fixed seed)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(3, 5, weight.shape[-1], generator=g).mul_(4).to(weight.device, weight.dtype)


def mlp_activation(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP's activation (``act(gate(x)) * up(x)``) as the backbone computes it."""
    act = getattr(mlp, "act_fn", None)
    if not callable(act):
        raise incompatible("transformers", f"{type(mlp).__name__}.act_fn (the gated MLP's activation)")
    return act


def forget_gguf_quantization(model: Any) -> None:
    """Drop transformers' GGUF "quantizer" markers from a model whose GGUF weights were dequantised to float at
    load: Trainer refuses to train a model that carries one, ``save_pretrained`` refuses to save it, and a config
    saved with its ``quantization_config`` reloads through the GGUF quantizer, though the weights are plain
    float tensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method).lower().endswith("gguf"):
        model.hf_quantizer = None
        model.is_quantized = False
    config = getattr(model, "config", None)
    marker = getattr(config, "quantization_config", None)
    if marker is not None:
        method = marker.get("quant_method") if isinstance(marker, dict) else getattr(marker, "quant_method", None)
        if str(method).lower().endswith("gguf"):
            delattr(config, "quantization_config")


def packed_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, rows: int, exact: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.linear(x, weight, bias)`` with the weight reordered once into the layout the CPU's GEMM kernel reads,
    so that no call repacks it (what torch.compile's CPU weight-prepacking pass does, by the same ops): bf16
    through oneDNN (1.3-2.2x faster than ``F.linear`` at decode-sized inputs, any number of rows), fp32 through
    MKL's packed sgemm (1.2-1.9x at SmolLM2's shapes, used for inputs of exactly ``rows`` rows; other inputs
    go to ``F.linear``, MKL's own rule). Bit for bit ``F.linear``: checked here on ``rows`` random rows, and a
    kernel that disagrees on this machine, or that this CPU cannot run, is not used. The packed copy is made
    now: later changes to ``weight`` are not seen. Check ``can_pack_linear`` first.

    An exact fp32 product with a vocabulary's worth of outputs (an LM head: ``HEAD_OUTPUTS`` or more) is not
    packed but computed in column blocks (``_column_blocks``).

    ``exact=False``: fp32 through oneDNN too (any number of rows; on an AMD CPU with AVX2 only, 1.2-2.3x faster
    than MKL's packed sgemm at SmolLM2's shapes), whose sums are not bit for bit ``F.linear``'s. Kept only where
    it is batch-invariant (a row's result does not depend on the other rows of the call, checked on a few row
    counts up to 4x ``rows``) and within fp32 rounding of ``F.linear``; otherwise as ``exact``."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()

    relaxed = not exact and weight.dtype == torch.float32  # fp32 through oneDNN: within rounding, batch-invariant

    def plain(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def fallback() -> Callable[[torch.Tensor], torch.Tensor]:  # for a kernel not kept: the exact path
        return packed_linear(weight, bias, rows) if relaxed and can_pack_linear(weight) else plain

    if weight.dtype == torch.float32 and not relaxed and weight.shape[0] >= HEAD_OUTPUTS:
        return _column_blocks(weight, bias, rows)

    try:  # oneDNN's bf16 reorder refuses a CPU without AVX-512 (or AVX-NE-CONVERT): F.linear serves it there
        if weight.dtype == torch.bfloat16 or relaxed:
            dnn = torch.ops.mkldnn
            onednn = dnn._reorder_linear_weight(weight, rows)

            def layer(x: torch.Tensor) -> torch.Tensor:
                return dnn._linear_pointwise(x, onednn, bias, "none", [], "")

        else:
            mkl = torch.ops.mkl
            packed = mkl._mkl_reorder_linear_weight(weight, rows)

            def layer(x: torch.Tensor) -> torch.Tensor:
                return mkl._mkl_linear(x, packed, weight, bias, rows)

    except RuntimeError:
        return fallback()
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4 * rows + 3 if relaxed else rows, weight.shape[1], generator=generator).to(weight.dtype)
        out, reference = layer(probe[:rows]), F.linear(probe[:rows], weight, bias)
        if not relaxed:
            kept = torch.equal(out, reference)
        else:
            scale = float(reference.abs().max())
            kept = torch.allclose(out, reference, rtol=1e-4, atol=1e-5 * scale) and all(
                torch.equal(layer(probe[:n])[: min(n, rows)], out[: min(n, rows)])
                for n in (1, rows // 2 + 1, len(probe))
            )
    return layer if kept else fallback()


# an exact fp32 product with at least HEAD_OUTPUTS outputs runs in blocks of HEAD_BLOCK outputs (packed_linear)
HEAD_OUTPUTS, HEAD_BLOCK = 16384, 1024


def _column_blocks(
    weight: torch.Tensor, bias: torch.Tensor | None, rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.linear(x, weight, bias)`` as ``F.linear`` over blocks of ``HEAD_BLOCK`` output columns, concatenated,
    for inputs of 2 to ``rows`` rows: on an AMD CPU with AVX2 only, MKL's single call over SmolLM2's 49,152
    columns takes 1.3-1.4x as long at 2 to 32 rows (at one row its matrix-vector kernel is faster), while each
    block sums each dot product as the single call does. Each row count's first input is computed both ways
    and gets ``F.linear``'s result; a row count where the two differ keeps ``F.linear``."""
    blocks = list(zip(weight.split(HEAD_BLOCK), bias.split(HEAD_BLOCK) if bias is not None else repeat(None)))
    kept: dict[int, bool] = {}  # row count -> whether the blocks reproduced F.linear on its first input

    def layer(x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[-1]
        if not 2 <= n <= rows or kept.get(n) is False:
            return F.linear(x, weight, bias)
        out = torch.cat([F.linear(x, w, b) for w, b in blocks], -1)
        if n not in kept:
            reference = F.linear(x, weight, bias)
            kept[n] = torch.equal(out, reference)
            return reference
        return out

    return layer


# per dtype: the torch.ops namespace, its reorder and linear ops, and the backend they need
_PACKED_LINEAR = {
    torch.bfloat16: ("mkldnn", "_reorder_linear_weight", "_linear_pointwise", torch.backends.mkldnn),
    torch.float32: ("mkl", "_mkl_reorder_linear_weight", "_mkl_linear", torch.backends.mkl),
}


def can_pack_linear(weight: torch.Tensor, exact: bool = True) -> bool:
    """Whether ``packed_linear`` serves ``weight``: a CPU tensor, bf16 (or, not ``exact``, fp32) with a torch
    built with oneDNN, or fp32 with one built with MKL, and the release still has the two ops (one without them
    falls back to ``F.linear``: slower, the same numbers)."""
    entry = _PACKED_LINEAR.get(torch.bfloat16 if weight.dtype == torch.float32 and not exact else weight.dtype)
    if entry is None or weight.device.type != "cpu":
        return False
    namespace, reorder, linear, backend = entry
    ops = getattr(torch.ops, namespace)
    return bool(backend.is_available()) and hasattr(ops, reorder) and hasattr(ops, linear)


def token_bytes(tokenizer: Any) -> Callable[[int], bytes | None]:
    """Each token id's own bytes, read from the tokenizer's vocabulary: what a token is when it holds only part of
    a UTF-8 character (an emoji or CJK character split over byte-level tokens), which no decode of it alone can
    show. Byte-level BPE (GPT-2's scheme: each byte written as one printable character, the table in
    transformers' ``bytes_to_unicode``) and SentencePiece's byte fallback (``<0xNN>`` pieces, ``\u2581`` for a
    space) are read; for any other tokenizer, or an id without a piece, the reader answers None."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's: a slow one has no JSON form
    if backend is None:
        return lambda token: None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        try:
            from transformers.convert_slow_tokenizer import bytes_to_unicode
        except ImportError as err:
            raise incompatible("transformers", "convert_slow_tokenizer.bytes_to_unicode") from err
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes | None:
            return bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else None

    elif "ByteFallback" in kinds:

        def piece_bytes(piece: str) -> bytes | None:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()

    else:
        return lambda token: None
    cache: dict[int, bytes | None] = {}

    def read(token: int) -> bytes | None:
        if token not in cache:
            piece = tokenizer.convert_ids_to_tokens(token)
            cache[token] = piece_bytes(piece) if isinstance(piece, str) else None
        return cache[token]

    return read
