"""One request's failure is its own: hostile sampling values, adapters that overflow or fail to load, a prefill
that raises, a flooding tenant, an engine bug. Every check runs a bystander beside the bad request and compares
its tokens with the bystander's run alone (a fresh engine, nothing else in it)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer

import pedro
from pedro.engine import (
    ADAPTER_LOAD_FAILED,
    ENGINE_FAILURE,
    NUMERIC_OVERFLOW,
    REQUEST_FAILED,
    AdapterError,
    AsyncEngine,
    Engine,
    EngineDead,
    QueueFull,
    Request,
    RequestError,
    SamplingParams,
)

GREEDY = SamplingParams(max_new_tokens=12)


def _pedro(tmp_path, name: str, scale: float, seed: int = 1) -> str:
    model = pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=4))
    randomize(model, seed=seed, scale=scale)
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def _engine(adapters: dict[str, str], **kwargs) -> Engine:
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64, **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    return {"good": _pedro(root, "good", 0.3), "huge": _pedro(root, "huge", 1e20, seed=2)}


def _bystander(adapter: str = "good") -> Request:
    return Request([3, 4, 5, 6], adapter=adapter, sampling=GREEDY, tenant="bob")


def _solo(dirs) -> list[int]:
    out = _engine(dirs).generate([_bystander()])[0]
    assert out.error is None
    return out.token_ids


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=1e-300),
        dict(temperature=5e-324),
        dict(temperature=1e-6),
        dict(temperature=1e308),
        dict(top_k=2**63),
        dict(temperature=1.0, top_p=1e-300),
        dict(temperature=1.0, top_p=5e-324),
        dict(temperature=1.0, top_p=0.0),
        dict(temperature=1.0, seed=2**63 - 1),
        dict(temperature=1.0, seed=-(2**63)),
        dict(temperature=1.0, repetition_penalty=5e-324),
        dict(temperature=1e-5, repetition_penalty=1e-300),
        dict(temperature=1.0, logit_bias={5: 100.0, 6: -100.0}, frequency_penalty=-2.0),
    ],
)
def test_extreme_sampling_values_run_and_leave_the_bystander_exact(dirs, sampling):
    solo = _solo(dirs)
    engine = _engine(dirs)
    hostile = Request([7, 8], sampling=SamplingParams(max_new_tokens=6, ignore_eos=True, **sampling), tenant="alice")
    outs = engine.generate([hostile, _bystander()])
    assert outs[0].error is None and len(outs[0].token_ids) == 6
    assert outs[1].token_ids == solo


def test_an_overflowing_adapter_fails_alone_and_its_slot_is_clean_afterwards(dirs):
    solo = _solo(dirs)
    engine = _engine(dirs)
    outs = engine.generate([Request([7, 8, 9], adapter="huge", sampling=GREEDY, tenant="alice"), _bystander()])
    assert outs[0].finish_reason == "error" and outs[0].error_code == NUMERIC_OVERFLOW and "'huge'" in outs[0].error
    assert outs[1].token_ids == solo
    # the failed row's cache slot is reused: any inf/NaN left in it would poison the next occupant
    again = engine.generate([_bystander(), _bystander()])
    assert [o.token_ids for o in again] == [solo, solo]
    assert torch.isfinite(engine.cache.k).all() and torch.isfinite(engine.cache.v).all()


def test_an_adapter_that_fails_to_load_fails_only_its_requests_and_blocks_nobody(dirs, tmp_path):
    solo = _solo(dirs)
    broken = _pedro(tmp_path, "broken", 0.3)
    engine = _engine({**dirs, "broken": broken}, max_per_tenant=None)
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    requests = [Request([7, 8], adapter="broken", sampling=GREEDY, tenant="alice") for _ in range(3)] + [_bystander()]
    outs = engine.generate(requests)
    assert all(o.error_code == ADAPTER_LOAD_FAILED and "'broken'" in o.error for o in outs[:3])
    assert outs[3].token_ids == solo


def test_adapter_weights_load_off_the_step(dirs):
    """While an adapter is being read, the running rows keep decoding one token per step."""
    engine = _engine(dirs)
    release, started = threading.Event(), threading.Event()
    load = engine.adapters.load

    def slow_load(name, entry=None):
        started.set()
        assert release.wait(30)
        return load(name, entry)

    engine.adapters.load = slow_load
    engine.add_request(Request([3, 4], sampling=SamplingParams(max_new_tokens=20), request_id="base"))
    engine.step()  # the base request is admitted and prefilled
    engine.add_request(_bystander())
    assert started.wait(10)
    for _ in range(5):  # the load is still blocked: every step still advances the running row
        assert [o.request_id for o in engine.step()] == ["base"]
    release.set()
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["base"].error is None and all(o.error is None for o in outs.values())


def test_a_prefill_failure_is_attributed_to_its_request(dirs, monkeypatch):
    solo = _solo(dirs)
    engine = _engine(dirs)
    engine.add_adapter("fragile", dirs["good"])
    real = engine.runner.prefill

    def prefill(batch):
        if any(
            engine.rows.row_entry[s] is not None and engine.rows.row_entry[s].name == "fragile" for s in batch.slots
        ):
            raise RuntimeError("generator exploded")
        return real(batch)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    outs = engine.generate([Request([7, 8], adapter="fragile", sampling=GREEDY), _bystander()])
    assert outs[0].error_code == REQUEST_FAILED and "generator exploded" in outs[0].error
    assert outs[1].token_ids == solo


def test_a_prefill_failure_in_a_decoding_step_is_attributed_to_its_request(dirs, monkeypatch):
    """A prompt admitted while a row decodes runs in the decoding row's forward; when that forward raises, the
    step is rerun the usual way (the decoding row alone, then the prompt alone), so the failure stays with the
    request that fails on its own and the decoding row's tokens do not change."""
    solo = _solo(dirs)
    engine = _engine(dirs)
    engine.add_adapter("fragile", dirs["good"])
    real, mixed = engine.runner.run, []

    def run(tokens, batch):
        if batch is not None and any(engine.rows.row_entry[s].name == "fragile" for s in batch.slots):
            mixed.append(tokens is not None)
            raise RuntimeError("generator exploded")
        return real(tokens, batch)

    monkeypatch.setattr(engine.runner, "run", run)
    bystander = engine.add_request(_bystander())
    engine.step()  # the bystander is prefilled and decoding
    fragile = engine.add_request(Request([7, 8], adapter="fragile", sampling=GREEDY))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert mixed == [True, False]  # its prompt failed with the decoding row, then alone
    assert outs[fragile].error_code == REQUEST_FAILED and "generator exploded" in outs[fragile].error
    assert outs[bystander].error is None and outs[bystander].token_ids == solo


def test_a_flooding_tenant_waits_behind_nobody_but_itself(dirs):
    """A submits 200 requests at once, B one: A's cap refuses A's excess, B is admitted within two steps
    (first come, first served would put it behind A's four waiting requests, one row freeing per step), and
    every request of A's that was accepted finishes."""
    engine = _engine(dirs, max_waiting=16, max_per_tenant=8)
    engine.generate([_bystander()])  # B's adapter is resident: the steps counted below are queueing only
    accepted, refused = [], 0
    for i in range(200):
        sampling = SamplingParams(max_new_tokens=1 + i % 4, ignore_eos=True)
        try:
            accepted.append(engine.add_request(Request([3, 4, i % 50 + 5], sampling=sampling, tenant="alice")))
        except QueueFull as err:
            assert "this tenant" in str(err)
            refused += 1
    assert len(accepted) == 8 and refused == 192
    outs = {o.request_id: o for o in engine.step() if o.finished}  # A's first four are admitted
    bystander_id = engine.add_request(_bystander())
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    bystander = outs.pop(bystander_id)
    assert bystander.metrics["queued_steps"] <= 2 and bystander.error is None
    assert sorted(outs) == sorted(accepted) and all(o.error is None for o in outs.values())


def test_an_adapter_used_by_a_waiting_request_cannot_be_removed(dirs):
    engine = _engine(dirs, max_waiting=8)
    for _ in range(4):  # the batch is full
        engine.add_request(Request([3, 4], sampling=SamplingParams(max_new_tokens=4)))
    engine.step()
    engine.add_request(_bystander())
    assert engine.num_waiting == 1
    with pytest.raises(AdapterError, match="in use by 1 running or waiting request"):
        engine.remove_adapter("good")
    with pytest.raises(AdapterError, match=r"^unknown adapter 'nope'$"):  # names nothing else that is registered
        engine.remove_adapter("nope")


def test_the_engine_thread_recovers_from_a_bug_in_a_step(dirs, monkeypatch):
    solo = _solo(dirs)
    engine = _engine(dirs)
    real, calls = engine.runner.decode, []

    def decode(tokens):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug")
        return real(tokens)

    monkeypatch.setattr(engine.runner, "decode", decode)

    async def run():
        async_engine = AsyncEngine(engine)
        try:
            first = await async_engine.generate(_bystander())
            second = await async_engine.generate(_bystander())
            return first, second, async_engine.alive, async_engine.restarts
        finally:
            async_engine.shutdown()

    first, second, alive, restarts = asyncio.run(run())
    assert first.finish_reason == "error" and first.error_code == ENGINE_FAILURE
    assert second.token_ids == solo and alive and restarts == 1


def test_a_dead_engine_thread_answers_every_call_instead_of_hanging(dirs, monkeypatch):
    engine = _engine(dirs)
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("step bug")))
    monkeypatch.setattr(engine, "reset", lambda reason: (_ for _ in ()).throw(RuntimeError("reset bug")))

    async def run():
        async_engine = AsyncEngine(engine)
        try:
            with pytest.raises(EngineDead):
                await asyncio.wait_for(async_engine.generate(_bystander()), 10)
            assert not async_engine.alive
            with pytest.raises(EngineDead):
                await asyncio.wait_for(async_engine.list_adapters(), 10)
        finally:
            async_engine.shutdown()

    asyncio.run(run())


def test_stats_are_bounded():
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=64)
    engine.generate([Request([3, 4], sampling=SamplingParams(max_new_tokens=5))])
    assert all(q.maxlen is not None and len(q) <= q.maxlen for q in engine.stats.values())
    assert len(engine.stats["decode"]) == 4


def test_a_prompt_that_is_not_valid_unicode_is_refused_before_the_tokenizer(dirs):
    engine = _engine(dirs)
    for prompt in ("3 \ud800 4", [{"role": "user", "content": "\udfff"}]):
        with pytest.raises(RequestError, match="not valid Unicode"):
            engine.encode(prompt)
