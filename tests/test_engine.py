"""The engine against independent references: each request run alone through transformers generate() with its
PEFT model (PEDRO from pedro, LoRA / (IA)3 from PEFT itself)."""

from __future__ import annotations

import asyncio

import peft
import pytest
import torch
from conftest import randomize, tiny_model
from transformers import TopKLogitsWarper, TopPLogitsWarper

import pedro
from pedro.engine import AdapterError, AsyncEngine, Engine, Request, RequestError, SamplingParams
from pedro.engine.runner import PrefillBatch
from pedro.engine.sampling import filter_logits
from pedro.evaluate import greedy_continuation

NEW = 8
WINDOW = 16  # conftest's tiny Gemma 3 sliding window


def backbone(family: str = "llama", **overrides) -> torch.nn.Module:
    """The tiny backbone of ``family``. Gemma 3 gets sliding and global layers (sliding, full, sliding: each
    type with its own RoPE) and random norm weights, so that every one of its norms shows in the outputs."""
    if family != "gemma3":
        return tiny_model(family, **overrides)
    model = tiny_model("gemma3", sliding_window_pattern=2, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial LoRA / (IA)3 weights (PEFT initialises LoRA B and (IA)3 vectors to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "ia3_" in name else 0.0))


ADAPTERS = {
    "p-last": ("pedro", dict(r=4)),
    "p-last-b": ("pedro", dict(r=4)),  # same shape as p-last: batched together at prefill
    "p-attn": (
        "pedro",
        dict(
            r=4,
            pooler="attention",
            activation="rational",
            targets=["q", "k", "v", "o", "gate", "up"],
            scale_bound=0.3,
        ),
    ),
    "p-shared": (
        "pedro",
        dict(r=3, share_generator=True, pooler="mean", pool_source="raw", normalize_pooled=True, layers=[0, 2]),
    ),
    "lora-qv": ("lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "lora-all": (
        "lora",
        dict(
            r=6,
            lora_alpha=3,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ),
    "ia3": (
        "ia3",
        dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    # scales up_proj's input: gate and up then read different inputs
    "ia3-up-in": ("ia3", dict(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"])),
}


def make_adapter(root, name: str, family: str = "llama", seed: int = 0) -> str:
    kind, kwargs = ADAPTERS[name]
    model = backbone(family)
    if kind == "pedro":
        wrapped = pedro.get_pedro_model(model, pedro.PedroConfig(**kwargs))
        randomize(wrapped, seed=seed + 1, scale=0.3)
    else:
        config = (peft.LoraConfig if kind == "lora" else peft.IA3Config)(task_type="CAUSAL_LM", **kwargs)
        wrapped = peft.get_peft_model(model, config)
        _perturb(wrapped, seed + 1)
    path = root / f"{family}-{name}-{seed}"
    wrapped.save_pretrained(str(path))
    return str(path)


def reference(family: str, adapter_dir: str | None, prompt: list[int], new_tokens: int = NEW, **overrides) -> list[int]:
    """The request alone through transformers generate (greedy), with its adapter loaded by PEFT."""
    model = backbone(family, **overrides)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return greedy_continuation(model, prompt, new_tokens)


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root, name, seed=i) for i, name in enumerate(ADAPTERS)}


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_mixed_batch_token_identical_to_each_request_alone(dirs):
    engine = Engine(tiny_model("llama"), max_batch=6, max_seq_len=64, max_prefill_tokens=40, adapter_capacity=8)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    plan = [
        ("p-last", 5),
        ("lora-qv", 17),
        (None, 9),
        ("p-attn", 3),
        ("p-last-b", 12),
        ("lora-all", 7),
        ("ia3", 14),
        ("p-shared", 11),
        ("p-last", 20),
        (None, 2),
    ]
    requests = [Request(prompt(i, n), adapter=a, sampling=greedy(NEW + i % 3)) for i, (a, n) in enumerate(plan)]
    results: dict[str, list[int]] = {}
    # arrivals at different steps: 4 now, 3 after two steps, the rest after two more
    for r in requests[:4]:
        engine.add_request(r)
    arrivals = {2: requests[4:7], 4: requests[7:]}
    step = 0
    while engine.has_unfinished() or arrivals:
        for r in arrivals.pop(step, []):
            engine.add_request(r)
        for out in engine.step():
            assert out.error is None
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    assert engine.num_running == 0
    for r in requests:
        expected = reference("llama", dirs[r.adapter] if r.adapter else None, r.prompt, r.sampling.max_new_tokens)
        assert results[r.request_id] == expected, f"adapter {r.adapter}"


def test_inexact_gemms_keep_each_request_independent_of_its_batch(dirs):
    """Engine(exact_gemms=False): fp32 products through oneDNN (not bit for bit F.linear, so no transformers
    reference here; on a CPU it also runs q/k/v and gate/up as one GEMM each), but a request's tokens are still
    those it gets alone, whatever shares its steps; and its logits stay within rounding of the exact engine's."""
    model = tiny_model("llama")
    fast = Engine(model, max_batch=6, max_seq_len=64, max_prefill_tokens=40, adapter_capacity=8, exact_gemms=False)
    exact = Engine(model, max_batch=6, max_seq_len=64, max_prefill_tokens=40, adapter_capacity=8)
    assert fast.fuse_projections and not exact.fuse_projections
    plan = [("p-last", 5), ("lora-qv", 17), (None, 9), ("p-attn", 3), ("ia3", 14), ("p-shared", 11), ("p-last", 20)]
    for engine in (fast, exact):
        for name in {a for a, _ in plan if a}:
            engine.add_adapter(name, dirs[name])
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1)
    requests = [Request(prompt(i, n), adapter=a, sampling=sampling) for i, (a, n) in enumerate(plan)]
    together = {r.request_id: r for r in requests}
    for r in requests[:4]:
        fast.add_request(r)
    outs, step = {}, 0
    while fast.has_unfinished() or step < 2:
        if step == 2:
            for r in requests[4:]:
                fast.add_request(r)
        for out in fast.step():
            if out.finished:
                outs[out.request_id] = out
        step += 1
    for rid, r in together.items():
        alone = fast.generate([Request(r.prompt, adapter=r.adapter, sampling=sampling)])[0]
        assert outs[rid].token_ids == alone.token_ids, f"adapter {r.adapter}"
        reference = exact.generate([Request(r.prompt, adapter=r.adapter, sampling=sampling)])[0]
        if reference.token_ids == alone.token_ids:  # same path: the logprobs of the chosen tokens agree closely
            a = [lp.logprob for lp in alone.logprobs]
            b = [lp.logprob for lp in reference.logprobs]
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


@pytest.mark.parametrize("scaling", [None, 0.25])
def test_decode_attention_as_matmuls_agrees_with_the_flash_kernel(dirs, scaling):
    """On a CPU in fp32 a decode step attends with two batched matmuls and a softmax (faster than the flash
    kernel at one query a row); the tokens are those the flash kernel gives and the logprobs agree to rounding.
    The scale: the tiny model's 1/sqrt(8) on the queries; a power of two (SmolLM2's 1/8; here 1/4) on the
    products, exact (tests/test_compat.py). bf16 keeps the flash kernel (its scores stay fp32)."""
    plan = [("p-last", 5), ("lora-qv", 17), (None, 9), ("p-attn", 3), ("ia3", 14)]
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1)
    outs = {}
    for matmuls, on_products in ((False, False), (True, False), (True, True)):
        if on_products and scaling is None:
            continue
        engine = Engine(tiny_model("llama"), max_batch=6, max_seq_len=64, adapter_capacity=8)
        assert engine.runner.matmul_decode_attention and not engine.runner.exact_alpha  # 1/sqrt(8)
        if scaling is not None:
            engine.runner.scaling = scaling
        engine.runner.matmul_decode_attention, engine.runner.exact_alpha = matmuls, on_products
        for name in {a for a, _ in plan if a}:
            engine.add_adapter(name, dirs[name])
        outs[matmuls, on_products] = engine.generate(
            [Request(prompt(i, n), adapter=a, sampling=sampling) for i, (a, n) in enumerate(plan)]
        )
    for matmuls in outs.values():
        for flash, row in zip(outs[False, False], matmuls):
            assert flash.token_ids == row.token_ids
            assert max(abs(x.logprob - y.logprob) for x, y in zip(flash.logprobs, row.logprobs)) < 1e-5
    bf16 = Engine(tiny_model("llama").to(torch.bfloat16), max_batch=2, max_seq_len=64)
    assert not bf16.runner.matmul_decode_attention


def test_tenants_last_token_generators_run_from_one_gather_and_do_not_touch_each_other(dirs, monkeypatch):
    """At prefill, last-token generators read their rows' states from one gather per layer (only the mean and
    attention poolers pool padded prompts); a row's first-layer vectors (made from its embeddings, so no
    backbone product over a different number of rows can change their bits) are the same bits alone as
    beside other tenants; every request's tokens equal its own PEFT model's."""
    from pedro.generator import VectorGenerator

    padded: list[str] = []
    forward = VectorGenerator.forward

    def spy(self, states, mask):
        padded.append(self.pooler)
        return forward(self, states, mask)

    monkeypatch.setattr(VectorGenerator, "forward", spy)

    def engine_with_adapters() -> Engine:
        engine = Engine(tiny_model("llama"), max_batch=6, max_seq_len=64, max_prefill_tokens=200, adapter_capacity=8)
        for name, path in dirs.items():
            engine.add_adapter(name, path)
        return engine

    def vectors_after_prefill(engine: Engine, requests: list[Request]) -> torch.Tensor:
        """Admit and prefill ``requests`` in one step; -> the first one's layer-0 q scales (slot 0)."""
        # resident first: adapters load off the engine's thread, and a request waits for its adapter
        engine.generate([Request([5], adapter=r.adapter, sampling=greedy(1)) for r in requests])
        for r in requests:
            engine.add_request(r)
        engine.step()
        return engine.rows.scales[("out", "q")][0, 0].clone()

    plan = [("p-last-b", 12), ("p-last", 5), ("p-attn", 3), ("p-last", 9), ("p-shared", 7), (None, 4)]
    requests = [Request(prompt(40 + i, n), adapter=a, sampling=greedy()) for i, (a, n) in enumerate(plan)]
    engine = engine_with_adapters()
    beside = vectors_after_prefill(engine, requests)
    assert set(padded) == {"attention", "mean"}  # p-attn and p-shared; p-last and p-last-b from the gather
    alone = vectors_after_prefill(
        engine_with_adapters(), [Request(prompt(40, 12), adapter="p-last-b", sampling=greedy())]
    )
    assert torch.equal(alone, beside) and alone.abs().sum() > 0
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    for r in requests:
        assert outs[r.request_id].error is None
        expected = reference("llama", dirs[r.adapter] if r.adapter else None, r.prompt)
        assert outs[r.request_id].token_ids == expected, r.adapter


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_other_backbones_mixed_batch(tmp_path, family):
    """Two PEDRO configs, LoRA, (IA)3 and bare rows on each other backbone, continuously batched; on Gemma 3
    some prompts are longer than its sliding window and others cross it while decoding."""
    names = ["p-last", "p-attn", "lora-all", "ia3"]
    paths = {name: make_adapter(tmp_path, name, family, seed=i) for i, name in enumerate(names)}
    engine = Engine(backbone(family), max_batch=4, max_seq_len=64, max_prefill_tokens=40)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    plan = [("p-last", 6), ("p-attn", 20), ("lora-all", 11), (None, 17), ("ia3", 3), ("p-last", 14), ("ia3", 24)]
    requests = [Request(prompt(i, n), adapter=a, sampling=greedy(10)) for i, (a, n) in enumerate(plan)]
    for r, out in zip(requests, engine.generate(requests)):
        assert out.token_ids == reference(family, paths.get(r.adapter), r.prompt, 10), r.adapter


def test_gemma3_sliding_window_is_served_and_matters(tmp_path):
    """Gemma 3 past its sliding window, at prefill (prompt longer than the window) and at decode (generation
    crossing it): token-identical to generate, and each case's tokens differ from the same backbone without a
    window, so the test sees the window."""
    assert set(backbone("gemma3").config.layer_types) == {"sliding_attention", "full_attention"}
    path = make_adapter(tmp_path, "p-attn", "gemma3")
    engine = Engine(backbone("gemma3"), max_batch=4, max_seq_len=64)
    engine.add_adapter("p", path)
    cases = [(None, prompt(1, WINDOW + 4)), ("p", prompt(5, WINDOW - 2))]
    outs = engine.generate([Request(p, adapter=a, sampling=greedy(12)) for a, p in cases])
    for (adapter, p), out in zip(cases, outs):
        adapter_dir = path if adapter else None
        assert out.token_ids == reference("gemma3", adapter_dir, p, 12)
        assert out.token_ids != reference("gemma3", adapter_dir, p, 12, sliding_window=64)


def test_gemma3_logits_match_the_backbone_forward():
    """Prefill and decode logits (sliding and global layers, final-logit softcapping) equal one full forward."""
    model = backbone("gemma3", final_logit_softcapping=2.0)
    engine = Engine(model, max_batch=2, max_seq_len=64)
    ids = prompt(3, WINDOW + 10)
    n = WINDOW - 3
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, n - 1 :]
    got = [engine.runner.prefill(PrefillBatch([0], [ids[:n]]))[0]]
    got += [engine.runner.decode(torch.tensor([t]))[0] for t in ids[n:]]
    assert expected.abs().max() < 2.0
    torch.testing.assert_close(torch.stack(got), expected, rtol=1e-5, atol=1e-5)


def test_in_memory_peft_model_and_eos(dirs):
    """An adapter given as a PeftModel object; EOS ends a request unless ignore_eos, like generate()."""
    model = peft.PeftModel.from_pretrained(tiny_model("llama"), dirs["p-attn"])
    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=64)
    engine.add_adapter("mem", model)
    p = prompt(3, 10)
    full = reference("llama", dirs["p-attn"], p, 12)
    engine.eos_ids = {full[4]}
    out = engine.generate([Request(p, adapter="mem", sampling=SamplingParams(max_new_tokens=12))])[0]
    assert out.finish_reason == "stop" and out.token_ids == full[: full.index(full[4]) + 1]


class CharTokenizer:
    """Token i <-> one character, so expected texts are computable by hand."""

    eos_token_id = 1
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) if i >= 3 else ("" if skip_special_tokens else "#") for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - ord("a") + 3 for c in text]}


def test_stop_strings_cut_correctly(dirs):
    engine = Engine(tiny_model("llama"), CharTokenizer(), max_batch=4, max_seq_len=64)
    engine.add_adapter("p", dirs["p-last"])
    full = engine.generate([Request("hello", adapter="p", sampling=greedy(20))])[0]
    stop = full.text[6:8]
    cut = full.text.index(stop)
    out = engine.generate(
        [Request("hello", adapter="p", sampling=SamplingParams(max_new_tokens=20, stop=[stop, "zzzz"]))]
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut] and stop not in out.text
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) == cut + len(stop)


def test_streaming_yields_exactly_the_offline_result(dirs):
    engine = Engine(tiny_model("llama"), CharTokenizer(), max_batch=4, max_seq_len=64)
    engine.add_adapter("p", dirs["p-attn"])
    engine.add_adapter("l", dirs["lora-qv"])
    requests = lambda: [
        Request("abcdef", adapter="p", sampling=greedy(12)),  # noqa: E731
        Request("xyz", adapter="l", sampling=SamplingParams(max_new_tokens=12, stop=["q"])),
    ]
    offline = engine.generate(requests())
    async_engine = AsyncEngine(engine)

    async def collect(request):
        tokens, text, last = [], "", None
        async for out in async_engine.stream(request):
            tokens += out.delta_token_ids
            text += out.delta_text
            last = out
        return tokens, text, last

    async def main():
        return await asyncio.gather(*(collect(r) for r in requests()))

    try:
        streamed = asyncio.run(main())
    finally:
        async_engine.shutdown()
    for off, (tokens, text, last) in zip(offline, streamed):
        assert tokens == off.token_ids == last.token_ids
        assert text == off.text == last.text and last.finish_reason == off.finish_reason


def test_cancel_frees_the_slot_and_leaves_others_alone(dirs):
    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=64)
    for name in ("p-last", "lora-qv", "p-attn"):
        engine.add_adapter(name, dirs[name])
    long_a = Request(prompt(1, 8), adapter="p-last", sampling=greedy(30))
    cancelled = Request(prompt(2, 8), adapter="lora-qv", sampling=greedy(30))
    waiting = Request(prompt(3, 6), adapter="p-attn", sampling=greedy(NEW))
    async_engine = AsyncEngine(engine)
    done: list[str] = []

    async def run_all():
        async def cancel_after_two():
            seen = 0
            async for out in async_engine.stream(cancelled):
                seen += len(out.delta_token_ids)
                if seen >= 2:
                    break  # leaving the stream aborts the request
            return seen

        async def finish(request):
            tokens = (await async_engine.generate(request)).token_ids
            done.append(request.request_id)
            return tokens

        a = asyncio.create_task(finish(long_a))
        c = asyncio.create_task(cancel_after_two())
        await asyncio.sleep(0)
        w = asyncio.create_task(finish(waiting))  # no free slot until the cancel
        return await asyncio.gather(a, c, w)

    try:
        tokens_a, seen, tokens_w = asyncio.run(run_all())
    finally:
        async_engine.shutdown()
    assert seen >= 2
    assert done == [waiting.request_id, long_a.request_id]  # the freed slot went to the waiting request
    assert tokens_a == reference("llama", dirs["p-last"], long_a.prompt, 30)
    assert tokens_w == reference("llama", dirs["p-attn"], waiting.prompt, NEW)
    assert engine.num_running == 0 and not engine.has_unfinished()


def test_lru_with_capacity_4_and_10_adapters(tmp_path):
    names = ["p-last", "lora-qv", "p-attn", "ia3", "lora-all"]
    dirs = {f"{n}-{s}": make_adapter(tmp_path, n, seed=10 + s) for s in range(2) for n in names}
    engine = Engine(tiny_model("llama"), max_batch=3, max_seq_len=64, adapter_capacity=4)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    order = list(dirs) * 2
    requests = [Request(prompt(20 + i, 4 + i % 5), adapter=a, sampling=greedy(4)) for i, a in enumerate(order)]
    engine.add_request(requests[0])
    pending, outputs = requests[1:], {}
    while engine.has_unfinished() or pending:
        if pending:
            engine.add_request(pending.pop(0))
        for out in engine.step():
            outputs[out.request_id] = out
        assert len(engine.adapters.resident) <= 4
    assert engine.adapters.evictions > 0
    for r in requests:
        assert outputs[r.request_id].token_ids == reference("llama", dirs[r.adapter], r.prompt, 4)


def test_bad_requests_fail_alone(dirs, tmp_path):
    engine = Engine(tiny_model("llama"), CharTokenizer(), max_batch=4, max_seq_len=32)
    engine.add_adapter("p", dirs["p-last"])
    good = Request(prompt(5, 6), adapter="p", sampling=greedy())
    bad = [
        Request(prompt(6, 4), adapter="nope"),
        Request(""),
        Request(prompt(7, 40)),
        Request([], adapter="p"),
        Request(prompt(8, 4), sampling="greedy"),
    ]
    outs = engine.generate([bad[0], good, *bad[1:]])
    assert outs[1].error is None and outs[1].token_ids == reference("llama", dirs["p-last"], good.prompt)
    errors = [o.error for o in outs[:1] + outs[2:]]
    assert all(errors) and "unknown adapter 'nope'" in errors[0] and "empty" in errors[1]
    assert "40 tokens; at most 31 are allowed (the context is 32" in errors[2] and "SamplingParams" in errors[4]
    for kwargs in (dict(temperature=-1.0), dict(top_p=-0.1), dict(top_k=-2), dict(max_new_tokens=-1), dict(stop=[""])):
        with pytest.raises(RequestError, match=next(iter(kwargs))):
            SamplingParams(**kwargs)
    other = pedro.get_pedro_model(tiny_model("llama", hidden_size=48), pedro.PedroConfig(r=4))
    other.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(AdapterError, match=r"shape \(4, 48\) in the file but \(4, 32\) on this backbone"):
        engine.add_adapter("wide", str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="softcapping"):
        Engine(backbone("gemma3", attn_logit_softcapping=50.0))


def test_sampling_filters_match_transformers_and_seeds_are_per_request(dirs):
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in ((5, 1.0), (0, 0.7), (10, 0.5)):
        ours = filter_logits(logits, torch.full((3,), 0.8), torch.full((3,), top_k), torch.full((3,), top_p))
        theirs = logits / 0.8
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(ours.isinf(), theirs.isinf())
        assert torch.allclose(ours.exp(), theirs.softmax(-1), atol=1e-6)
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=64)
    engine.add_adapter("p", dirs["p-last"])
    sampled = SamplingParams(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    alone = engine.generate([Request(prompt(9, 5), adapter="p", sampling=sampled)])[0].token_ids
    crowd = engine.generate(
        [
            Request(prompt(10, 7), sampling=greedy()),
            Request(prompt(9, 5), adapter="p", sampling=sampled),
            Request(prompt(11, 3), adapter="p", sampling=SamplingParams(temperature=1.0, seed=1)),
        ]
    )
    assert crowd[1].token_ids == alone
    top1 = SamplingParams(max_new_tokens=NEW, temperature=2.0, top_k=1, seed=3, ignore_eos=True)
    assert engine.generate([Request(prompt(12, 5), adapter="p", sampling=top1)])[0].token_ids == reference(
        "llama", dirs["p-last"], prompt(12, 5)
    )
