"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt.

With the default last-token pooler a generator reads one state per prompt, so the pooled states of every such
row in the prefill are gathered at once per layer, and the heads (Down, act, Up) of every adapter of one head
form run as one batched product, each row with its own adapter's weights; adapters that scale the same modules
also share one write into the per-row tables. Per layer that is one gather, one stack of the rows' heads, a few
products and one write for all tenants, where one product per tenant per layer used to cost more than the
products themselves (32 tenants on SmolLM2: 960 heads a prefill). The generator computes each
row's products on their own (``pedro.generator.row_products``), so a row's z has the same bits alone, in a
batch, or in the PEFT model; it depends only on its own adapter and prompt, never on other tenants'. A
generator with a mean or attention pooler runs on its adapter's padded prompts, as in training. The grouping
is made once per prefill, its index tensors on the model's device, so the per-layer loop never builds a host
tensor nor waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pedro.engine.adapters import PedroWeights
from pedro.engine.device import upload
from pedro.generator import HeadStack


@dataclass(frozen=True)
class PedroGroup:
    """The prefill rows of one PEDRO adapter: their rows in the batch, on the model's device, and where they
    sit among their batch's rows (``span``)."""

    weights: PedroWeights
    rows: torch.Tensor
    span: tuple[int, int]


@dataclass(frozen=True)
class PedroBatch:
    """PEDRO adapters whose vectors are made and written together: ``groups`` (one per adapter, their rows
    contiguous), all their rows' slots and the packed index of each row's last prompt token, in group order.
    Not ``last_token``: one adapter whose generators pool its rows' padded prompts. Where ``stacked`` the
    groups' heads (all of one form) run as one batched product."""

    groups: list[PedroGroup]
    slots: torch.Tensor
    lasts: torch.Tensor
    last_token: bool
    stacked: tuple[PedroWeights, ...] = ()  # where the heads run stacked: each row's adapter, in row order


def _batch_key(weights: PedroWeights) -> tuple | None:
    """Adapters with equal keys share a batch: last-token pooling from the same states, the same scaled
    slices, heads of one form; None: the adapter pools whole prompts and runs alone."""
    if any(g.pooler != "last" for g in weights.generators.values()):
        return None
    slices = tuple((layer, tuple(s)) for layer, s in sorted(weights.slices.items()))
    return weights.config.pool_source, slices, weights.head_form


def batch_rows(rows: list[tuple[int, int, PedroWeights]], lasts: list[int], device: torch.device) -> list[PedroBatch]:
    """(row in the batch, slot, weights) of each PEDRO row and each batch row's last packed token -> the
    prefill's batches of PEDRO rows, one group per adapter."""
    by_adapter: dict[int, list[tuple[int, int, PedroWeights]]] = {}
    for item in rows:
        by_adapter.setdefault(id(item[2]), []).append(item)
    by_key: dict[object, list[list[tuple[int, int, PedroWeights]]]] = {}
    padded: set[object] = set()  # the keys of adapters that pool whole prompts, one adapter each
    for items in by_adapter.values():
        shared = _batch_key(items[0][2])
        key: object = id(items) if shared is None else shared
        if shared is None:
            padded.add(key)
        by_key.setdefault(key, []).append(items)
    batches = []
    for key, adapters in by_key.items():
        groups, start = [], 0
        for items in adapters:
            groups.append(
                PedroGroup(items[0][2], upload([r for r, _, _ in items], device), (start, start + len(items)))
            )
            start += len(items)
        flat = [item for items in adapters for item in items]
        # one key, one head form: every adapter of a batch of several has heads to stack, or none has
        batches.append(
            PedroBatch(
                groups,
                slots=upload([s for _, s, _ in flat], device),
                lasts=upload([lasts[r] for r, _, _ in flat], device),
                last_token=key not in padded,
                stacked=tuple(w for _, _, w in flat) if len(groups) > 1 and flat[0][2].heads else (),
            )
        )
    return batches


def generate_vectors(
    batch: PedroBatch, layer: int, raw: torch.Tensor, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Run ``batch``'s generators of ``layer`` on their rows' prompt states -> z (rows, D), rows in the order
    of ``batch.slots``.

    ``index`` / ``mask`` (rows, T_max) place each batch row's packed prompt tokens (``raw`` / ``normed`` are
    (tokens, d)) into a padded (rows, T_max, d), for a generator that pools whole prompts.
    """
    weights = batch.groups[0].weights
    source = normed if weights.config.pool_source == "normed" else raw
    if not batch.last_token:
        group = batch.groups[0]
        return weights.generators[layer](source[index[group.rows]], mask[group.rows])
    pooled = source[batch.lasts]
    if batch.stacked:  # every group's generators compute the same function of their weights; one copy of the
        # rows' heads per layer, not per prefill: memory of one layer's heads, whatever the model's depth
        heads = HeadStack.stack([adapter.heads[layer] for adapter in batch.stacked])
        return weights.generators[layer].head(pooled, heads)
    parts = [group.weights.generators[layer].head(pooled[slice(*group.span)]) for group in batch.groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
