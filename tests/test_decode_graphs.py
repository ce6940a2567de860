"""Decode steps padded to batch and width buckets (what a CUDA graph replays), run eagerly on the CPU: every
request's tokens equal its own PEFT model's alone, padding rows write only the scratch slot, and the buckets
are the ones documented."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from test_engine import backbone, greedy, make_adapter, prompt, reference

from pedro.engine import Engine, Request
from pedro.engine import decode_graphs as graphs_module
from pedro.engine.decode_graphs import batch_buckets

KINDS = ["p-last", "p-attn", "lora-qv", "lora-all", "ia3"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-adapters")
    return {
        (family, name): make_adapter(root, name, family, seed=i)
        for family in ("llama", "gemma3")
        for i, name in enumerate(KINDS)
    }


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padded_steps_give_each_request_its_own_tokens(kinds, family, monkeypatch):
    """Rows join and leave, so the batch crosses buckets (1 -> 2 -> 4 -> 6 rows and back) and, with 16-key width
    blocks, the key width too (Gemma 3's sliding layers mask inside a padded width)."""
    monkeypatch.setattr(graphs_module, "WIDTH_BLOCK", 16)
    engine = Engine(backbone(family), max_batch=6, max_seq_len=64, max_prefill_tokens=40, decode_graphs="padded")
    assert engine.runner.graphs is not None and not engine.runner.graphs.capture
    for (fam, name), path in kinds.items():
        if fam == family:
            engine.add_adapter(name, path)
            engine.adapters.stage(name, engine.adapters.load(name))  # no request waits for the loader thread
    plan = [("p-last", 5), (None, 19), ("lora-qv", 9), ("p-attn", 13), ("ia3", 3), ("lora-all", 21), ("p-last", 7)]
    requests = [Request(prompt(70 + i, n), adapter=a, sampling=greedy(6 + 3 * i)) for i, (a, n) in enumerate(plan)]
    arrivals = {0: requests[:1], 2: requests[1:2], 4: requests[2:]}
    results: dict[str, list[int]] = {}
    widths, batches = set(), set()
    step = 0
    while engine.has_unfinished() or arrivals:
        for r in arrivals.pop(step, []):
            engine.add_request(r)
        running = engine.num_running
        if running:
            batches.add(engine.runner.graphs.bucket(running, 1)[0])
            widths.add(engine.runner.graphs.bucket(running, int(engine.cache.lengths[:running].max()) + 1)[1])
        for out in engine.step():
            assert out.error is None
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    assert {1, 2, 4, 6} <= batches and len(widths) >= 3
    for r in requests:
        adapter = kinds[(family, r.adapter)] if r.adapter else None
        assert results[r.request_id] == reference(family, adapter, r.prompt, r.sampling.max_new_tokens), r.adapter


def test_padding_rows_write_only_the_scratch_slot():
    engine = Engine(tiny_model("llama"), max_batch=8, max_seq_len=32, decode_graphs="padded")
    scratch = engine.cache.scratch_slot
    assert scratch == 8 and engine.cache.k.shape[1] == 9 and engine.cache.slots == 8
    for t in (engine.cache.k, engine.cache.v):
        t[:, 3:] = 7.0  # a mark in every slot no row runs in, and in the scratch slot
    engine.generate([Request(prompt(i, 4 + i), sampling=greedy(3)) for i in range(3)])  # 3 rows: bucket 4
    for t in (engine.cache.k, engine.cache.v):
        assert (t[:, 3:scratch] == 7.0).all()  # slots 3..7 untouched
        assert (t[:, scratch, :, 0] != 7.0).all()  # the padding row's key and value went to the scratch slot
        assert (t[:, scratch, :, 1:] == 7.0).all()  # at position 0


def test_decode_graphs_setting():
    assert Engine(tiny_model("llama"), max_batch=2, max_seq_len=16).runner.graphs is None  # auto, on the CPU
    assert Engine(tiny_model("llama"), max_batch=2, max_seq_len=16, decode_graphs="off").cache.scratch_slot is None
    with pytest.raises(ValueError, match="decode_graphs must be one of"):
        Engine(tiny_model("llama"), max_batch=2, max_seq_len=16, decode_graphs="cuda")


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch, caplog):
    """A step whose capture raises (an op a CUDA graph cannot hold) is run eagerly, and so is every later step:
    the requests get their tokens and the engine says why."""
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=32, decode_graphs="padded")
    graphs = engine.runner.graphs
    graphs.capture = True  # as on a CUDA device; the capture itself then fails

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", fail)
    requests = [Request(prompt(90 + i, 5 + i), sampling=greedy()) for i in range(3)]
    with caplog.at_level("WARNING", logger="pedro.engine.decode_graphs"):
        outs = engine.generate(requests)
    assert [o.token_ids for o in outs] == [reference("llama", None, r.prompt) for r in requests]
    assert not graphs.capture and not graphs.graphs
    assert "decoding without graphs" in caplog.text
