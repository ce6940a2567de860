"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt.

With the default last-token pooler a generator reads one state per prompt, so the pooled states of every such
row in the prefill are gathered at once per layer, and each adapter's generator then runs its head (Down, act,
Up) on its own rows; adapters that scale the same modules also share one write into the per-row tables. Per
layer that is one gather and one write for all tenants plus a few small matrix products per adapter, where
each adapter used to pool its rows from a padded copy of their prompts and write them itself. A row's z
depends only on its own adapter's rows, never on other tenants'. A generator with a mean or attention pooler
runs on its adapter's padded prompts, as in training. On an accelerator the heads of a batch's adapters run as
one batched product over every row, each row with its own adapter's weights (``stacked``). The grouping is
made once per prefill, its index tensors on the model's device, so the per-layer loop never builds a host
tensor nor waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pedro.engine.adapters import PedroWeights
from pedro.engine.device import upload
from pedro.generator import HeadStack, stacked_heads


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
    Not ``last_token``: one adapter whose generators pool its rows' padded prompts."""

    groups: list[PedroGroup]
    slots: torch.Tensor
    lasts: torch.Tensor
    last_token: bool
    group_of_row: torch.Tensor | None = None  # each row's group, where the heads run stacked (stacked_heads)
    heads: HeadStack | None = None  # there: every group's heads, (groups, its layers in order, ...)
    positions: dict[int, int] = field(default_factory=dict)  # layer -> its index among the stack's layers


def _batch_key(weights: PedroWeights) -> tuple | None:
    """Adapters with equal keys share a batch: last-token pooling from the same states, the same scaled
    slices; None: the adapter pools whole prompts and runs alone."""
    if any(g.pooler != "last" for g in weights.generators.values()):
        return None
    return weights.config.pool_source, tuple((layer, tuple(s)) for layer, s in sorted(weights.slices.items()))


def batch_rows(
    rows: list[tuple[int, int, PedroWeights]], lasts: list[int], device: torch.device, stacked: bool = False
) -> list[PedroBatch]:
    """(row in the batch, slot, weights) of each PEDRO row and each batch row's last packed token -> the
    prefill's batches of PEDRO rows, one group per adapter. ``stacked``: run a last-token batch's heads of the
    same form as one batched product (pedro.generator.stacked_heads) rather than one per adapter -- on an
    accelerator, where each of those products is a kernel launch per tenant per layer. Their weights are
    stacked once here (each adapter's own stack over its layers made on its first use), so a layer gathers
    its rows' heads with one op per weight."""
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
        heads = _head_stack([items[0][2] for items in adapters]) if stacked and key not in padded else None
        batches.append(
            PedroBatch(
                groups,
                slots=upload([s for _, s, _ in flat], device),
                lasts=upload([lasts[r] for r, _, _ in flat], device),
                last_token=key not in padded,
                group_of_row=(
                    None if heads is None else upload([g for g, items in enumerate(adapters) for _ in items], device)
                ),
                heads=heads,
                positions={layer: i for i, layer in enumerate(sorted(flat[0][2].generators))},
            )
        )
    return batches


def _head_stack(adapters: list[PedroWeights]) -> HeadStack | None:
    """Several adapters' heads as one stack (adapters, layers, ...), if each has one, all of one form."""
    if len(adapters) < 2:
        return None
    stacks = [weights.head_stack() for weights in adapters]
    forms = {weights.generators[min(weights.generators)].head_form() for weights in adapters}
    if len(forms) != 1 or any(stack is None for stack in stacks):
        return None
    return HeadStack.cat([stack for stack in stacks if stack is not None])


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
    if batch.heads is not None and batch.group_of_row is not None:
        form = weights.generators[layer]  # every group's generators compute the same function of their weights
        return stacked_heads(form, batch.heads.take(batch.positions[layer], batch.group_of_row), pooled)
    parts = [group.weights.generators[layer].head(pooled[slice(*group.span)]) for group in batch.groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
