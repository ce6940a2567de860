"""PEDRO's tuner layers, in PEFT's shape: a tap on each layer's input norm that runs the vector generator at
prefill, and a wrapper on each scaled projection that scales its output by 1 + z (applied as out + out * z,
see ``apply_scale``).

The two talk through one ``PedroState`` per model: the tap writes a layer's vectors (one row per sequence),
the projections read them at every forward, prefill or decode. Vectors are only (re)computed on a forward
that processes the prompt, so decoding with a KV cache reuses them for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from pedro.generator import VectorGenerator


def apply_scale(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``out * (1 + z)``, computed as ``out + out * z`` in one kernel (``torch.addcmul``): the exact value rounded
    once to ``out``'s dtype. Rounding ``1 + z`` to bf16 first would quantise every scale to steps of 2^-7 just
    above 1 (z = 0.003 would become 0, z = 0.006 would become 0.0078); z itself keeps bf16's relative precision.
    ``z`` is cast to ``out``'s dtype (it broadcasts against ``out``), so the PEFT model and the engine, which
    stores z in the backbone's dtype, compute the same numbers. When a gradient is needed (training), the
    backward pass is :class:`_Scale`'s, which does the work once; the forward value is the same addcmul."""
    z = z.to(out.dtype)
    if torch.is_grad_enabled() and (out.requires_grad or z.requires_grad):
        return _Scale.apply(out, z)
    return torch.addcmul(out, out, z)


class _Scale(torch.autograd.Function):
    """``out + out * z`` with a lean backward. Autograd's own addcmul backward sees ``out`` twice (as the sum's
    input and as a factor), so it computes ``out``'s gradient as g, then g * z, then adds the two: three passes
    over a (B, T, D) tensor per scaled projection, where ``g + g * z`` is one addcmul (20-40 % of the scale's
    forward + backward time on SmolLM2, measured in docs/training.md)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(out, z)
        return torch.addcmul(out, out, z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out, z = ctx.saved_tensors
        grad_out = torch.addcmul(grad, grad, z) if ctx.needs_input_grad[0] else None
        grad_z = (grad * out).sum_to_size(z.shape) if ctx.needs_input_grad[1] else None
        return grad_out, grad_z


@dataclass
class PedroState:
    """Per-model, per-forward state shared by all PEDRO layers.

    ``prompt_mask`` (B, T) marks the prompt tokens of the forward being run when it is a prefill, and is None
    on a decoding step. ``vectors[(layer, adapter)]`` is that adapter's z (B, D) for the current batch.
    """

    prompt_mask: torch.Tensor | None = None
    vectors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    shared_generators: dict[str, VectorGenerator] = field(default_factory=dict)

    def vector(self, layer: int, adapter: str, batch: int) -> torch.Tensor:
        z = self.vectors.get((layer, adapter))
        if z is None:
            raise RuntimeError(
                f"PEDRO adapter {adapter!r} has no vectors for layer {layer}: a decoding step ran before any "
                "prefill forward over a prompt (pass the prompt first, or call generate())"
            )
        if z.shape[0] != batch:
            raise RuntimeError(
                f"PEDRO vectors were computed at prefill for a batch of {z.shape[0]} rows, but this forward has "
                f"{batch}; a cache cannot be continued with a different batch, run a new prefill"
            )
        return z


class PedroLayer(BaseTunerLayer):
    """Common base of PEDRO's tuner layers (what the tuner recognises as its own)."""


class PedroTap(nn.Module, PedroLayer):
    """Wraps a decoder layer's input norm: returns the norm's output unchanged and, during a prefill, runs
    the layer's vector generator on the prompt positions of the normalised (or raw) states."""

    adapter_layer_names = ("pedro_generator",)
    other_param_names = ("pedro_pool_source",)

    def __init__(self, base_layer: nn.Module, layer_index: int, pedro_state: PedroState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.pedro_state = pedro_state
        self.pedro_generator = nn.ModuleDict()
        self.pedro_pool_source: dict[str, str] = {}

    def update_layer(self, adapter_name: str, generator: VectorGenerator | None, pool_source: str) -> None:
        """Add an adapter; ``generator`` is None when the adapter shares one generator across layers."""
        if generator is not None:
            self.pedro_generator[adapter_name] = generator
        self.pedro_pool_source[adapter_name] = pool_source
        self.set_adapter(self.active_adapters)

    def _generator(self, adapter: str) -> VectorGenerator:
        if adapter in self.pedro_generator:
            return cast(VectorGenerator, self.pedro_generator[adapter])
        return self.pedro_state.shared_generators[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        normed = self.base_layer(x, *args, **kwargs)
        mask = self.pedro_state.prompt_mask
        if mask is not None and not self.disable_adapters:
            for adapter in self.active_adapters:
                if adapter in self.pedro_pool_source:
                    source = normed if self.pedro_pool_source[adapter] == "normed" else x
                    self.pedro_state.vectors[(self.layer_index, adapter)] = self._generator(adapter)(source, mask)
        return normed


class PedroLinear(nn.Module, PedroLayer):
    """Wraps a projection: out * (1 + z[:, start:end]) (as ``apply_scale``) for every position of the sequence,
    one z row per sequence. It owns no weights; its slice of the layer's generator output is kept per adapter."""

    adapter_layer_names = ()
    other_param_names = ("pedro_slice",)

    def __init__(self, base_layer: nn.Module, layer_index: int, pedro_state: PedroState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.pedro_state = pedro_state
        self.pedro_slice: dict[str, tuple[int, int]] = {}

    def update_layer(self, adapter_name: str, start: int, end: int) -> None:
        self.pedro_slice[adapter_name] = (start, end)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        for adapter in self.active_adapters:
            if adapter not in self.pedro_slice:
                continue
            start, end = self.pedro_slice[adapter]
            z = self.pedro_state.vector(self.layer_index, adapter, out.shape[0])[:, start:end]
            out = apply_scale(out, z.unsqueeze(1))
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("PEDRO's scales depend on each prompt, so they cannot be merged into weights")
