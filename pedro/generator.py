"""The vector generator: pool a layer's prompt states, then Up(act(Down(p))).

Everything here is plain torch and independent of PEFT and transformers, so the method's equations can be
read (and tested) on one screen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Least-squares fit of the safe rational form to GELU on [-10, 10] (numerator degree 6, denominator degree 5).
# Max abs error 6.8e-3 on [-4, 4]; beyond the fit range it grows polynomially (about x^2), never to a pole,
# because the safe denominator 1 + sum |b_j| |x|^j is at least 1.
GELU_NUMERATOR = (
    -0.006847491607,
    0.5,
    0.4330763554,
    0.1431016223,
    0.02272366783,
    0.001742613258,
    5.184495742e-05,
)
GELU_DENOMINATOR = (2.969463838e-14, 0.2862032447, 5.557071847e-15, 0.003485226516, 2.454420142e-17)
# x^6 stays far below fp32's range at this bound; inputs are clamped so the ratio is finite for any input.
RATIONAL_INPUT_BOUND = 1e4


class RationalActivation(nn.Module):
    """R(x) = (a_0 + ... + a_6 x^6) / (1 + |b_1| |x| + ... + |b_5| |x|^5), learnable a and b.

    Evaluated in fp32 on inputs clamped to +-1e4 whatever the input dtype: in bf16/fp16 the powers would
    overflow long before the ratio does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(GELU_NUMERATOR, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(GELU_DENOMINATOR, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float().clamp(-RATIONAL_INPUT_BOUND, RATIONAL_INPUT_BOUND)
        a = self.numerator.float()
        b = self.denominator.float().abs()
        num = a[-1].expand_as(xf)
        for coef in a.flip(0)[1:]:  # Horner
            num = num * xf + coef
        ax = xf.abs()
        den = b[-1] * ax
        for coef in b.flip(0)[1:]:
            den = (den + coef) * ax
        return (num / (1.0 + den)).to(x.dtype)


# Element-wise CPU kernels take a vector path over whole blocks of contiguous elements and a scalar path over
# the rest, and the two can round transcendental functions (erf, exp, tanh) differently; rows padded to whole
# blocks (this many fp32 elements covers every CPU's block) take the vector path wherever they sit in a batch.
ROW_BLOCK = 64
# Below this many elements torch runs an element-wise op on one thread (at::internal::GRAIN_SIZE); above it the
# threads split the elements at offsets of their own, each part with its own scalar tail.
ONE_THREAD_ELEMENTS = 32768


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (element-wise) on rows (..., k), each row's values independent of the other rows and of their
    number: the same bits whether a row is computed alone or with others, which lets the serving engine batch
    every tenant's rows. Rows are padded to whole blocks and run a thread's worth at a time."""
    width = x.shape[-1]
    blocks = x.reshape(-1, width)
    if width % ROW_BLOCK:
        blocks = torch.nn.functional.pad(blocks, (0, ROW_BLOCK - width % ROW_BLOCK))
    step = max(1, ONE_THREAD_ELEMENTS // blocks.shape[1])
    parts = [fn(blocks[i : i + step]) for i in range(0, max(1, blocks.shape[0]), step)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[:, :width].reshape(x.shape)


def row_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) times weight (N, out, in) -- or one (out, in) for every row -- plus bias: each row's product
    computed on its own (a batch of one-row products), so its bits do not depend on how many rows share the
    call nor on whose weights they are. ``F.linear`` blocks rows into one GEMM whose rounding changes with the
    row count; this form lets the engine run every tenant's heads as one batched product with each tenant's own
    bits (tests/test_generator.py checks that invariance)."""
    rows = x.shape[0]
    if weight.dim() == 2:
        weight = weight.expand(rows, *weight.shape)
    y = torch.bmm(x[:, None, :], weight.transpose(1, 2))[:, 0, :]
    return y if bias is None else y + bias


class RowLinear(nn.Linear):
    """nn.Linear whose rows are each their own product (``row_products``); the same parameters and state
    dict, so it stays a linear layer to every tool that walks the module tree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return row_products(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(*lead, -1)


def make_activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "rational":
        return RationalActivation()
    raise ValueError(f"unknown activation {name!r}")


def pool(states: torch.Tensor, mask: torch.Tensor, how: str, scorer: nn.Linear | None = None) -> torch.Tensor:
    """Pool (B, T, d) states over the positions where ``mask`` (B, T) is True.

    ``last`` takes each row's last masked position, so left or right padding and any prompt length work.
    """
    if how == "last":
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    m = mask.unsqueeze(-1)
    if how == "max":
        return states.masked_fill(~m, float("-inf")).amax(1)
    states = states.masked_fill(~m, 0.0)  # a pad's value, even inf, must not reach a sum
    if how == "mean":
        return states.sum(1) / m.sum(1).clamp_min(1)
    if how == "attention":
        if scorer is None:
            raise ValueError("the attention pooler needs its scorer")
        scores = scorer(states).squeeze(-1).masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=1).unsqueeze(-1) * states).sum(1)
    raise ValueError(f"unknown pooler {how!r}")


NORMALIZE_EPS = 1e-6


class VectorGenerator(nn.Module):
    """z = Up(act(Down(Pool(h)))) with Up zero-initialised, so the scales 1 + z start exactly at 1.

    Two optional forms, both the identity at initialisation and free of parameters: ``normalize`` divides the
    pooled vector by its root mean square before Down (the raw residual stream's norms grow from layer to layer
    and reach the tens of thousands, which a fixed Down must otherwise absorb), and ``scale_bound`` = c maps z to
    c * tanh(z / c), so every scale 1 + z stays within c of 1 whatever the prompt (slope 1 at z = 0)."""

    def __init__(
        self,
        d_model: int,
        r: int,
        out_features: int,
        pooler: str,
        activation: str,
        bias: bool,
        normalize: bool = False,
        scale_bound: float | None = None,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.normalize = normalize
        self.scale_bound = scale_bound
        self.scorer = nn.Linear(d_model, 1, bias=False) if pooler == "attention" else None
        if self.scorer is not None:
            nn.init.zeros_(self.scorer.weight)  # uniform attention (= mean pooling) at init
        self.down = RowLinear(d_model, r, bias=bias)
        self.act = make_activation(activation)
        self.up = RowLinear(r, out_features, bias=bias)
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (B, T, d), mask (B, T) bool -> z (B, out_features) in the generator's dtype.

        The generator computes in its own dtype (fp32) also under autocast: it is a few (B, d) rows per layer,
        and the states it pools may be bf16 and large (unnormalised residuals reach norms in the tens of
        thousands). The last-token pooler picks its rows before converting them, not the whole (B, T, d).
        """
        dtype = self.down.weight.dtype
        with torch.autocast(device_type=states.device.type, enabled=False):
            if self.pooler == "last":
                pooled = pool(states, mask, "last")
            else:
                pooled = pool(states.to(dtype), mask, self.pooler, self.scorer)
            return self.head(pooled)

    def head(self, pooled: torch.Tensor, heads: "HeadStack | None" = None) -> torch.Tensor:
        """z from pooled rows (B, d): everything after the pooler. The engine calls it directly on the prompts'
        last-token states, gathered for all its tenants' rows at once: with ``heads``, row i runs through head i
        of that stack (each of this generator's ``head_form``) rather than through this generator's weights --
        one batched product for every tenant's rows, each row's bits those of its own generator alone."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            x = self._normalized(pooled)
            if heads is None:
                return self._bound(self.up(rowwise(self.act, self.down(x))))
            h = row_products(x, heads.down, heads.down_bias)
            return self._bound(row_products(rowwise(self.act, h), heads.up, heads.up_bias))

    def _normalized(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled.to(self.down.weight.dtype)
        if self.normalize:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORMALIZE_EPS)
        return x

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale_bound is None:
            return z
        bound = self.scale_bound
        return rowwise(lambda u: bound * torch.tanh(u / bound), z)

    def head_form(self) -> tuple | None:
        """What this head computes besides its Down/Up weights: generators with equal forms can run as one
        batched product (``head`` with a ``HeadStack``). None: not stackable (a rational activation's
        coefficients are weights of their own)."""
        if isinstance(self.act, RationalActivation):
            return None
        return (
            type(self.act),
            self.normalize,
            self.scale_bound,
            tuple(self.down.weight.shape),
            tuple(self.up.weight.shape),
            self.down.bias is not None,
            self.down.weight.dtype,
        )


@dataclass(frozen=True)
class HeadStack:
    """Generator heads' weights stacked on leading axes (one head per index): Down (..., r, d), Up (..., D, r),
    their biases (..., r) / (..., D) or None."""

    down: torch.Tensor
    down_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None

    @classmethod
    def stack(cls, stacks: list["HeadStack"]) -> "HeadStack":
        """``stacks`` (of the same shapes) stacked on a new first axis."""

        def stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if tensors[0] is None else torch.stack([t for t in tensors if t is not None])

        down, up = stack([s.down for s in stacks]), stack([s.up for s in stacks])
        assert down is not None and up is not None
        return cls(down, stack([s.down_bias for s in stacks]), up, stack([s.up_bias for s in stacks]))

    @classmethod
    def of(cls, generator: VectorGenerator) -> "HeadStack":
        """One generator's head (no leading axis): its own weights, not a copy."""
        return cls(generator.down.weight, generator.down.bias, generator.up.weight, generator.up.bias)


def generator_parameter_count(d_model: int, r: int, out_features: int, pooler: str, activation: str, bias: bool) -> int:
    """Closed form of one generator's trainable parameters: d*r + r*D, the biases r + D when enabled, the
    attention pooler's scorer d and the rational activation's coefficients."""
    count = d_model * r + r * out_features
    if bias:
        count += r + out_features
    if pooler == "attention":
        count += d_model
    if activation == "rational":
        count += len(GELU_NUMERATOR) + len(GELU_DENOMINATOR)
    return count
