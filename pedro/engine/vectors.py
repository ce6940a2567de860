"""PEDRO's vectors for a prefill batch: every row's own VectorGenerator on its own prompt, batched.

Rows whose generators have the same shape and knobs are evaluated together: their parameters are stacked
(torch.func.stack_module_state) and pedro.generator.VectorGenerator's own forward is vmapped over them, so
the method's equations exist once (generator.py) and a prefill of 32 tenants costs one batched call per
layer instead of 32 small ones.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch.func import functional_call, stack_module_state, vmap

from pedro.generator import VectorGenerator


def _signature(generator: VectorGenerator, pool_source: str) -> tuple:
    shapes = tuple((name, tuple(p.shape)) for name, p in generator.named_parameters())
    return type(generator.act).__name__, generator.pooler, pool_source, shapes


def generate_vectors(
    jobs: list[tuple[int, VectorGenerator, str]], raw: torch.Tensor, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Run each job's generator on its row's prompt states.

    jobs: (row, generator, pool_source) with row indexing ``index`` / ``mask`` (rows, T_max), which place
    each row's packed prompt tokens (``raw`` / ``normed`` are (tokens, d)) into a padded (rows, T_max, d).
    -> row -> z (D,)
    """
    groups: dict[tuple, list[tuple[int, VectorGenerator, str]]] = defaultdict(list)
    for job in jobs:
        groups[_signature(job[1], job[2])].append(job)
    vectors: dict[int, torch.Tensor] = {}
    for members in groups.values():
        rows = torch.tensor([row for row, _, _ in members])
        source = normed if members[0][2] == "normed" else raw
        states = source[index[rows]]  # (R, T_max, d)
        row_mask = mask[rows]
        if len(members) == 1:
            z = members[0][1](states, row_mask)
        else:
            params, buffers = stack_module_state([g for _, g, _ in members])
            template = copy.deepcopy(members[0][1]).to("meta")

            def one(p: dict, b: dict, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
                return functional_call(template, (p, b), (s.unsqueeze(0), m.unsqueeze(0)))[0]

            z = vmap(one)(params, buffers, states, row_mask)
        for (row, _, _), vector in zip(members, z):
            vectors[row] = vector
    return vectors
