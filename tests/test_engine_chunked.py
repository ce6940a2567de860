"""Bounded prefill per step: chunked prefill (bare, LoRA, (IA)3 rows) and prefill layer by layer (PEDRO rows,
rows scoring their prompt; a layer's positions split over steps) give exactly the tokens of the whole-prompt
prefill and of PEFT's generate, in mixed batches, while decoding rows keep getting a token every step."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from test_engine import backbone, greedy, make_adapter, prompt, reference

from pedro.engine import Engine, Request, SamplingParams
from pedro.engine.runner import ModelRunner

KINDS = ["p-last", "p-attn", "p-shared", "lora-all", "ia3"]
LAYERS = 3  # conftest's tiny models


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked-adapters")
    return {name: make_adapter(root, name, seed=20 + i) for i, name in enumerate(KINDS)}


def _pieces(monkeypatch) -> dict[str, list]:
    """Record what each prefill forward ran (alone, or in one forward with a decode step): rows' starts (by
    position) and layer ranges (by layers); and how many forwards decoded and prefilled together."""
    seen: dict[str, list] = {"starts": [], "layers": [], "mixed": []}
    run, prefill_layers = ModelRunner.run, ModelRunner.prefill_layers

    def by_position(self, tokens, batch):
        if batch is not None:
            seen["starts"] += [(s, len(p)) for s, p in zip(batch.starts or [0] * len(batch.prompts), batch.prompts)]
            if tokens is not None:
                seen["mixed"].append(len(tokens))
        return run(self, tokens, batch)

    def by_layers(self, state, end):
        n = len(state.prompt)
        seen["layers"].append((state.done * n + state.position, end, n))  # token-layers [from, end), prompt tokens
        return prefill_layers(self, state, end)

    monkeypatch.setattr(ModelRunner, "run", by_position)
    monkeypatch.setattr(ModelRunner, "prefill_layers", by_layers)
    return seen


def _start_decoding(engine: Engine) -> None:
    """One row decoding (for 40 tokens) before the test's requests arrive: the prefill budget applies while rows
    decode (an idle engine prefills whatever it admits whole)."""
    engine.add_request(Request(prompt(58, 3), sampling=greedy(40)))
    while not engine.num_running:
        engine.step()


def test_an_idle_engine_prefills_a_long_prompt_whole_and_a_busy_one_splits_it(monkeypatch):
    seen = _pieces(monkeypatch)
    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=64, max_prefill_tokens=6)
    whole = engine.generate([Request(prompt(57, 20), sampling=greedy(2))])[0]
    assert not any(start > 0 for start, _ in seen["starts"])  # nothing decoding: one piece
    _start_decoding(engine)
    seen["starts"].clear()
    split = engine.generate([Request(prompt(57, 20), sampling=greedy(2))])[0]
    assert any(start > 0 for start, _ in seen["starts"]) and max(n for _, n in seen["starts"]) <= 6
    assert seen["mixed"]  # its chunks ran in the decoding row's forwards
    assert split.token_ids == whole.token_ids == reference("llama", None, prompt(57, 20), 2)


def _run(engine: Engine, requests: list[Request], arrivals: dict[int, list[Request]]) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}
    for r in requests:
        engine.add_request(r)
    step = 0
    while engine.has_unfinished() or arrivals:
        for r in arrivals.pop(step, []):
            engine.add_request(r)
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    return results


def test_chunked_and_layer_range_prefill_are_token_identical(kinds, monkeypatch):
    """A budget of 6 tokens (18 token-layers): every prompt of 7+ tokens is split, by position or by layers,
    while the rows already admitted decode; each request's tokens equal PEFT generate's and the unbounded
    engine's."""
    plan = [
        ("p-last", 13),
        (None, 20),
        ("lora-all", 17),
        ("p-attn", 9),
        ("ia3", 15),
        ("p-shared", 7),
        ("p-last", 4),
        (None, 3),
        ("lora-all", 11),
    ]
    requests = [Request(prompt(60 + i, n), adapter=a, sampling=greedy(6 + i % 3)) for i, (a, n) in enumerate(plan)]
    seen = _pieces(monkeypatch)
    outputs = {}
    for budget in (6, 2048):
        engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=64, max_prefill_tokens=budget)
        for name, path in kinds.items():
            engine.add_adapter(name, path)
        fresh = [Request(r.prompt, adapter=r.adapter, sampling=r.sampling) for r in requests]
        # a row decoding from the first step on: the budget bounds the steps it waits through (an idle engine
        # prefills whatever it admits whole)
        keeper = Request(prompt(59, 2), sampling=greedy(50))
        got = _run(engine, [keeper], {1: fresh[:3], 3: fresh[3:6], 6: fresh[6:]})
        outputs[budget] = [got[r.request_id] for r in fresh]
        assert engine.num_running == 0
        if budget == 6:
            assert any(start > 0 for start, _ in seen["starts"]), "nothing was prefilled by position in chunks"
            # the 13-token PEDRO prompt: runs of token-layers within the budget's 18, covering its 39 in order,
            # some starting or ending inside a layer (the rest of it in a later step)
            pieces = sorted((start, end) for start, end, n in set(seen["layers"]) if n == 13)
            assert pieces[0][0] == 0 and pieces[-1][1] == 39 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            assert any(start % 13 or end % 13 for start, end in pieces), "no PEDRO layer split by positions"
            assert all(end - start <= 18 for start, end, _ in seen["layers"])
            assert max(n for _, n in seen["starts"]) <= 6
    assert outputs[6] == outputs[2048]
    for r, tokens in zip(requests, outputs[6]):
        assert tokens == reference("llama", kinds.get(r.adapter), r.prompt, r.sampling.max_new_tokens), r.adapter


def test_decoding_rows_get_a_token_every_step_while_a_long_prompt_is_admitted(kinds):
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=96, max_prefill_tokens=8)
    for name, path in kinds.items():
        engine.add_adapter(name, path)
    decoding = [
        Request(prompt(80 + i, 5), adapter=a, sampling=greedy(40)) for i, a in enumerate(["p-last", None, "ia3"])
    ]
    for r in decoding:
        engine.add_request(r)
    while engine.num_running < 3 or any(len(engine._seqs[r.request_id].output_ids) == 0 for r in decoding):
        engine.step()
    for adapter, length in (("lora-all", 50), ("p-attn", 24)):  # 50 tokens: 7 chunks; 24 x 3 layers: 3 steps
        long = Request(prompt(90, length), adapter=adapter, sampling=greedy(3))
        engine.add_request(long)
        steps = 0
        while not engine._seqs[long.request_id].output_ids:
            before = [len(engine._seqs[r.request_id].output_ids) for r in decoding]
            engine.step()
            after = [len(engine._seqs[r.request_id].output_ids) for r in decoding]
            assert after == [n + 1 for n in before]
            if engine._seqs[long.request_id].admitted_at_step is not None:  # its adapter may be loading first
                # chunks by position share the decoding rows' forward; a PEDRO prompt's layer ranges run on their own
                prefilled = engine.stats["mixed"][-1][1] if adapter == "lora-all" else engine.stats["prefill"][-1][0]
                assert prefilled <= 8
                steps += 1
        assert steps == (7 if adapter == "lora-all" else 3)
        while long.request_id in engine._seqs:
            engine.step()
        assert engine._seqs  # the decoding rows are still running
    results = _run(engine, [], {})
    assert results.keys() == {r.request_id for r in decoding}
    for r in decoding:
        assert results[r.request_id] == reference("llama", kinds.get(r.adapter), r.prompt, 40)


@pytest.mark.parametrize("adapter", ["lora-all", "p-last"])
def test_a_retirement_or_an_abort_during_a_split_prefill(kinds, adapter):
    """A decoding row retires while a long prompt is part-way (its slot then moves next to the decoding rows
    when it finishes), and an aborted part-way prompt frees its slot; every other row is unaffected."""
    engine = Engine(tiny_model("llama"), max_batch=3, max_seq_len=96, max_prefill_tokens=6)
    for name, path in kinds.items():
        engine.add_adapter(name, path)
    short = Request(prompt(101, 4), adapter="ia3", sampling=greedy(5))  # retires while the long prompt is part-way
    stays = Request(prompt(102, 5), sampling=greedy(30))
    long = Request(prompt(103, 40), adapter=adapter, sampling=greedy(6))
    aborted = Request(prompt(104, 40), adapter=adapter, sampling=greedy(6))
    # both adapters resident first: a background load finishing at an arbitrary step would shift the timing
    engine.generate([Request(prompt(100, 2), adapter=a, sampling=greedy(1)) for a in ("ia3", adapter)])
    moves = []
    move = engine.cache.move
    engine.cache.move = lambda src, dst: (moves.append((src, dst)), move(src, dst))
    results = _run(engine, [short, stays], {3: [long]})
    assert (2, 1) in moves  # the finished long prompt moved from its slot into the hole the retirement left
    _start_decoding(engine)  # the engine is idle again: a decoding row makes the next prompt split
    engine.add_request(aborted)
    engine.step()
    engine.step()
    assert engine.scheduler.partial is not None and engine.num_running == 2
    engine.abort(aborted.request_id)
    assert engine.scheduler.partial is None and engine.num_running == 1
    for r in (short, stays, long):
        assert results[r.request_id] == reference("llama", kinds.get(r.adapter), r.prompt, r.sampling.max_new_tokens)
    retry = Request(aborted.prompt, adapter=adapter, sampling=greedy(6))
    again = _run(engine, [retry], {})
    assert again[retry.request_id] == reference("llama", kinds[adapter], aborted.prompt, 6)


def test_gemma3_chunks_across_its_sliding_window(tmp_path):
    """Chunks of 5 tokens of prompts longer than the sliding window (16): every chunk's queries see the cached
    keys within the window only."""
    path = make_adapter(tmp_path, "lora-all", "gemma3")
    engine = Engine(backbone("gemma3"), max_batch=3, max_seq_len=64, max_prefill_tokens=5)
    engine.add_adapter("l", path)
    _start_decoding(engine)
    cases = [(None, prompt(111, 30)), ("l", prompt(112, 23))]
    outs = engine.generate([Request(p, adapter=a, sampling=greedy(8)) for a, p in cases])
    for (adapter, p), out in zip(cases, outs):
        assert out.token_ids == reference("gemma3", path if adapter else None, p, 8)


def test_prompt_logprobs_split_by_layers_equal_the_whole_prefill(kinds):
    scored = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=2)
    results = []
    for budget in (4, 2048):
        engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=64, max_prefill_tokens=budget)
        engine.add_adapter("l", kinds["lora-all"])
        _start_decoding(engine)
        results.append(engine.generate([Request(prompt(120, 21), adapter="l", sampling=scored)])[0])
    split, whole = results
    assert split.token_ids == whole.token_ids
    # the same alternatives; their numbers within fp32 rounding (a layer's positions split over steps attend
    # through masks over the cached ones, where the whole prompt's attention is one causal call)
    assert [(e.token, [t for t, _ in e.top]) for e in split.prompt_logprobs] == [
        (e.token, [t for t, _ in e.top]) for e in whole.prompt_logprobs
    ]
    assert split.prompt_logprobs[1:] and all(
        abs(a.logprob - b.logprob) < 1e-5 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a.top, b.top))
        for a, b in zip(split.prompt_logprobs[1:], whole.prompt_logprobs[1:])
    )
