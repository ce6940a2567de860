"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt.

Rows of the same adapter share one call (VectorGenerator takes a padded batch with a mask); different
adapters are separate calls. That per-adapter loop runs once per layer at prefill only -- about 60 us per
adapter per layer on CPU, ~2 % of a 32-row prefill -- and never at a decoding step. (A torch.func.vmap over
stacked generator parameters was measured 3-4x slower than the loop at these sizes, so it is not used.)
The grouping is made once per prefill, its index tensors on the model's device, so the per-layer loop never
builds a host tensor nor waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pedro.engine.adapters import PedroWeights
from pedro.engine.device import upload


@dataclass(frozen=True)
class PedroGroup:
    """The prefill rows of one PEDRO adapter: their rows in the batch and their slots, on the model's device."""

    weights: PedroWeights
    rows: torch.Tensor
    slots: torch.Tensor


def group_rows(rows: list[tuple[int, int, PedroWeights]], device: torch.device) -> list[PedroGroup]:
    """(row in the batch, slot, weights) of each PEDRO row -> one group per adapter."""
    groups: dict[int, list[tuple[int, int, PedroWeights]]] = {}
    for item in rows:
        groups.setdefault(id(item[2]), []).append(item)
    return [
        PedroGroup(
            items[0][2],
            upload([r for r, _, _ in items], device),
            upload([s for _, s, _ in items], device),
        )
        for items in groups.values()
    ]


def generate_vectors(
    group: PedroGroup, layer: int, raw: torch.Tensor, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Run ``group``'s generator of ``layer`` on its rows' prompt states -> z (rows, D).

    ``index`` / ``mask`` (rows, T_max) place each row's packed prompt tokens (``raw`` / ``normed`` are
    (tokens, d)) into a padded (rows, T_max, d).
    """
    source = normed if group.weights.config.pool_source == "normed" else raw
    return group.weights.generators[layer](source[index[group.rows]], mask[group.rows])
