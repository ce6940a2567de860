"""A prefill's PEDRO vectors: every row gets the z its own adapter's generator computes on that row's prompt
alone, bit for bit, however the prefill mixes tenants -- several rows of one adapter, adapters of one head form
run as one batched product, an adapter of another form, one that pools whole prompts -- and at any thread
count."""

from __future__ import annotations

import pytest
import torch

from pedro.config import PedroConfig
from pedro.engine.adapters import PedroWeights
from pedro.engine.vectors import batch_rows, generate_vectors
from pedro.generator import VectorGenerator

D_MODEL, R, OUT, LAYERS = 48, 4, 40, (1, 3)


def _adapter(seed: int, pooler: str = "last", activation: str = "gelu") -> PedroWeights:
    torch.manual_seed(seed)
    generators = {layer: VectorGenerator(D_MODEL, R, OUT, pooler, activation, bias=True) for layer in LAYERS}
    for gen in generators.values():
        for p in gen.parameters():
            torch.nn.init.normal_(p, std=0.3)
    config = PedroConfig(r=R, pooler=pooler, activation=activation)
    return PedroWeights(config, generators, {layer: [("q", 0, OUT)] for layer in LAYERS})


@pytest.mark.parametrize("threads", [1, 2])
def test_each_rows_vectors_are_its_generators_on_its_prompt_alone(threads):
    adapters = [_adapter(0), _adapter(1), _adapter(2), _adapter(3, activation="rational"), _adapter(4, "mean")]
    plan = [0, 1, 0, 2, 3, 0, 4, 1]  # each batch row's adapter: several rows of one, one of another form
    lengths = [5, 9, 3, 7, 6, 1, 8, 4]
    torch.manual_seed(10)
    normed = (torch.randn(sum(lengths), D_MODEL) * 4).to(torch.bfloat16)  # the packed prompts' states
    raw = normed * 3
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    width = max(lengths)
    steps = torch.arange(width)
    mask = steps[None, :] < torch.tensor(lengths)[:, None]
    index = torch.where(mask, torch.tensor(starts)[:, None] + steps, 0)
    rows = [(row, 100 + row, adapters[a]) for row, a in enumerate(plan)]
    lasts = [start + n - 1 for start, n in zip(starts, lengths)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = batch_rows(rows, lasts, torch.device("cpu"))
        assert any(batch.stacked for batch in batches)  # the check covers the batched product
        with torch.no_grad():
            for layer in LAYERS:
                got: dict[int, torch.Tensor] = {}
                for batch in batches:
                    z = generate_vectors(batch, layer, raw, normed, index, mask)
                    got.update({int(slot): row_z for slot, row_z in zip(batch.slots, z)})
                for row, slot, weights in rows:
                    alone = normed[starts[row] : starts[row] + lengths[row]][None]  # pool_source "normed"
                    everywhere = torch.ones(1, lengths[row], dtype=torch.bool)
                    assert torch.equal(got[slot], weights.generators[layer](alone, everywhere)[0]), (layer, row)
    finally:
        torch.set_num_threads(before)
