"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt.

Rows of the same adapter share one call (VectorGenerator takes a padded batch with a mask); different
adapters are separate calls. That per-adapter loop runs once per layer at prefill only -- about 60 us per
adapter per layer on CPU, ~2 % of a 32-row prefill -- and never at a decoding step. (A torch.func.vmap over
stacked generator parameters was measured 3-4x slower than the loop at these sizes, so it is not used.)
"""

from __future__ import annotations

import torch

from pedro.generator import VectorGenerator


def generate_vectors(
    jobs: list[tuple[int, VectorGenerator, str]], raw: torch.Tensor, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> list[tuple[list[int], torch.Tensor]]:
    """Run each job's generator on its row's prompt states.

    jobs: (row, generator, pool_source); ``index`` / ``mask`` (rows, T_max) place each row's packed prompt
    tokens (``raw`` / ``normed`` are (tokens, d)) into a padded (rows, T_max, d).
    -> [(rows, z (len(rows), D))], one entry per generator
    """
    groups: dict[tuple[int, str], list[int]] = {}
    generators: dict[tuple[int, str], VectorGenerator] = {}
    for row, generator, source in jobs:
        key = (id(generator), source)
        groups.setdefault(key, []).append(row)
        generators[key] = generator
    results = []
    for key, rows in groups.items():
        states = (normed if key[1] == "normed" else raw)[index[rows]]  # (R, T_max, d)
        results.append((rows, generators[key](states, mask[rows])))
    return results
