"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt.

Adapters whose generators have one shape (the default last-token pooler, an activation without parameters,
equal sizes, the same scaled modules) run together: per layer, their generators' weights are stacked and every
row's z comes out of a few batched ops (generator.stacked_forward), so 32 tenants' prompts cost a few ops per
layer instead of a few dozen; and a row's z is the same bits whichever tenants share its prefill, alone
included. A generator that cannot be stacked (a mean or attention pooler, the rational activation) runs alone
on its adapter's rows, padded with a mask. All of it runs
once per layer at prefill only, never at a decoding step, and the grouping is made once per prefill, its index
tensors on the model's device, so the per-layer loop never builds a host tensor nor waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pedro.engine.adapters import PedroWeights
from pedro.engine.device import upload
from pedro.generator import stacked_forward


@dataclass(frozen=True)
class PedroGroup:
    """The prefill rows of one PEDRO adapter: their rows in the batch and their slots, on the model's device."""

    weights: PedroWeights
    rows: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True)
class PedroBatch:
    """PEDRO adapters whose generators run together: ``groups`` (one per adapter), all their rows' slots and
    the packed index of each row's last prompt token, in group order, and ``which`` group each row is in.
    Not ``stacked``: one adapter whose generator runs its own forward."""

    groups: list[PedroGroup]
    slots: torch.Tensor
    lasts: torch.Tensor
    which: torch.Tensor
    stacked: bool


def _stack_key(weights: PedroWeights) -> tuple | None:
    """Adapters with equal keys can share a batch (see the module's docstring); None: runs alone."""
    keys = tuple((layer, g.shape_key()) for layer, g in sorted(weights.generators.items()))
    if any(key is None for _, key in keys):
        return None
    slices = tuple((layer, tuple(s)) for layer, s in sorted(weights.slices.items()))
    return weights.config.pool_source, keys, slices


def batch_rows(rows: list[tuple[int, int, PedroWeights]], lasts: list[int], device: torch.device) -> list[PedroBatch]:
    """(row in the batch, slot, weights) of each PEDRO row and each batch row's last packed token -> the
    prefill's batches of PEDRO rows: one group per adapter, groups of one stack key together."""
    by_adapter: dict[int, list[tuple[int, int, PedroWeights]]] = {}
    for item in rows:
        by_adapter.setdefault(id(item[2]), []).append(item)
    by_key: dict[object, list[list[tuple[int, int, PedroWeights]]]] = {}
    alone: set[object] = set()
    for items in by_adapter.values():
        stack_key = _stack_key(items[0][2])
        key: object = id(items) if stack_key is None else stack_key
        if stack_key is None:
            alone.add(key)
        by_key.setdefault(key, []).append(items)
    batches = []
    for key, adapters in by_key.items():
        groups = [
            PedroGroup(items[0][2], upload([r for r, _, _ in items], device), upload([s for _, s, _ in items], device))
            for items in adapters
        ]
        flat = [(i, r, s) for i, items in enumerate(adapters) for r, s, _ in items]
        batches.append(
            PedroBatch(
                groups,
                slots=upload([s for _, _, s in flat], device),
                lasts=upload([lasts[r] for _, r, _ in flat], device),
                which=upload([i for i, _, _ in flat], device),
                stacked=key not in alone,
            )
        )
    return batches


def generate_vectors(
    batch: PedroBatch, layer: int, raw: torch.Tensor, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Run ``batch``'s generators of ``layer`` on their rows' prompt states -> z (rows, D), rows in the order
    of ``batch.slots``.

    ``index`` / ``mask`` (rows, T_max) place each batch row's packed prompt tokens (``raw`` / ``normed`` are
    (tokens, d)) into a padded (rows, T_max, d), for a generator that runs alone.
    """
    weights = batch.groups[0].weights
    source = normed if weights.config.pool_source == "normed" else raw
    if not batch.stacked:
        group = batch.groups[0]
        return weights.generators[layer](source[index[group.rows]], mask[group.rows])
    generators = [group.weights.generators[layer] for group in batch.groups]
    return stacked_forward(generators, source[batch.lasts], batch.which)
