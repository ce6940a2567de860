"""Prompt logprobs (SamplingParams.prompt_logprobs) against an independent computation: the request's prompt run
once through transformers with its adapter loaded by PEFT (PEDRO from pedro), log-softmax at every position,
the next prompt token gathered. Bare, LoRA and PEDRO requests share one mixed batch with rows that ask for
nothing; n samples of one prompt share its prefill."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer

import pedro
from pedro.engine import Engine, Request, RequestError, SamplingParams
from pedro.engine import runner as runner_module


def _adapter(root, kind: str, seed: int) -> str:
    model = tiny_model("llama")
    if kind == "pedro":
        wrapped = pedro.get_pedro_model(model, pedro.PedroConfig(r=4))
        randomize(wrapped, seed=seed, scale=0.3)
    else:
        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        )
    path = root / f"{kind}-{seed}"
    wrapped.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-logprobs")
    return {"pedro": _adapter(root, "pedro", 1), "lora": _adapter(root, "lora", 2)}


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(adapter_dir: str | None, prompt: list[int]) -> torch.Tensor:
    """log-softmax (T, V) of the prompt's logits through transformers, the adapter loaded by PEFT."""
    model = tiny_model("llama")
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def _check(out, prompt: list[int], reference: torch.Tensor, k: int, atol: float = 1e-4) -> None:
    entries = out.prompt_logprobs
    assert [e.token for e in entries] == prompt
    assert entries[0].logprob is None and entries[0].top == ()
    expected = [float(reference[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert [e.logprob for e in entries[1:]] == pytest.approx(expected, abs=atol)
    for i, entry in enumerate(entries[1:]):
        top = reference[i].topk(k)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=atol)


def test_prompt_logprobs_of_a_mixed_batch_match_each_prompt_through_transformers(adapters, monkeypatch):
    # score a few positions per log-softmax so the chunking is exercised by these short prompts
    monkeypatch.setattr(runner_module, "PROMPT_LOGPROB_CHUNK", 4)
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=8, max_seq_len=64)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    # adjustments and temperature change the sampled tokens, never the prompt's logprobs (the raw distribution)
    noisy = dict(temperature=1.5, seed=4, repetition_penalty=1.7, logit_bias={11: 50.0}, frequency_penalty=1.0)
    plan = [
        ("pedro", _prompt(1, 11), SamplingParams(max_new_tokens=3, prompt_logprobs=3, **noisy)),
        (None, _prompt(2, 6), SamplingParams(max_new_tokens=4, ignore_eos=True)),  # asks for nothing
        ("lora", _prompt(3, 9), SamplingParams(max_new_tokens=0, prompt_logprobs=0)),
        (None, _prompt(4, 13), SamplingParams(max_new_tokens=2, prompt_logprobs=5, logprobs=1)),
        ("pedro", _prompt(5, 7), SamplingParams(max_new_tokens=4, ignore_eos=True)),  # asks for nothing
        ("lora", _prompt(6, 1), SamplingParams(max_new_tokens=1, prompt_logprobs=2)),  # nothing to score
    ]
    outs = engine.generate([Request(p, adapter=a, sampling=s) for a, p, s in plan])
    for (adapter, prompt, sampling), out in zip(plan, outs):
        assert out.error is None, out.error
        if sampling.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        reference = _reference(adapters.get(adapter), prompt)
        if adapter is not None and len(prompt) > 1:  # the adapter matters, so a bare computation would fail
            assert not torch.allclose(reference[:-1], _reference(None, prompt)[:-1], atol=1e-3)
        _check(out, prompt, reference, sampling.prompt_logprobs)
        assert "".join(e.text for e in out.prompt_logprobs) == " ".join(map(str, prompt))
    scored = outs[2]
    assert scored.token_ids == [] and scored.finish_reason == "length" and scored.finished
    # the rows that asked for nothing are token-identical to their runs alone
    for (adapter, prompt, sampling), out in zip(plan, outs):
        if sampling.prompt_logprobs is None:
            solo = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=8, max_seq_len=64)
            if adapter:
                solo.add_adapter(adapter, adapters[adapter])
            assert out.token_ids == solo.generate([Request(prompt, adapter=adapter, sampling=sampling)])[0].token_ids


def test_only_the_rows_that_ask_pay_for_full_vocabulary_logits(monkeypatch):
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=8, max_seq_len=64)
    rows: list[int] = []
    logits = engine.runner._logits
    monkeypatch.setattr(engine.runner, "_logits", lambda hidden: rows.append(hidden.shape[0]) or logits(hidden))
    requests = [
        Request(_prompt(7, 12), sampling=SamplingParams(max_new_tokens=1)),
        Request(_prompt(8, 9), sampling=SamplingParams(max_new_tokens=1, prompt_logprobs=2)),
        Request(_prompt(9, 20), sampling=SamplingParams(max_new_tokens=1, logprobs=3)),
    ]
    for r in requests:
        engine.add_request(r)
    assert all(out.finished for out in engine.step())  # all three prefilled together, in one step
    assert sum(rows) == 3 + (9 - 1)  # each row's next-token logits, and the scored prompt's other positions


def test_n_samples_share_the_prefill_and_its_prompt_logprobs(adapters):
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=8, max_seq_len=64)
    engine.add_adapter("pedro", adapters["pedro"])
    prompt = _prompt(10, 10)
    ks = [1, None, 4]  # the same prompt with different asks: one prefill, each row gets its own k
    requests = [
        Request(
            prompt,
            adapter="pedro",
            sampling=SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, prompt_logprobs=k),
        )
        for s, k in enumerate(ks)
    ]
    outs = engine.generate(requests)
    assert [n for n, _ in engine.stats["prefill"]] == [len(prompt)]
    reference = _reference(adapters["pedro"], prompt)
    for k, out in zip(ks, outs):
        if k is None:
            assert out.prompt_logprobs is None
        else:
            _check(out, prompt, reference, k)


def test_prompt_logprobs_in_bfloat16_within_its_precision(adapters):
    engine = Engine(tiny_model("llama").to(torch.bfloat16), tiny_tokenizer(), max_batch=4, max_seq_len=64)
    engine.add_adapter("pedro", adapters["pedro"])
    prompt = _prompt(11, 12)
    for adapter in (None, "pedro"):
        out = engine.generate(
            [Request(prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=0, prompt_logprobs=0))]
        )[0]
        reference = _reference(adapters.get(adapter), prompt)
        expected = [float(reference[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
        # bf16 keeps 8 bits of mantissa: logits of size ~1 are off by ~1e-2 after three layers
        assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(expected, abs=0.1)


def test_prompt_text_and_the_bounds_of_the_new_options():
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64)
    out = engine.generate([Request([2, 30, 31], sampling=SamplingParams(max_new_tokens=0, return_prompt_text=True))])[0]
    assert out.prompt_text == "30 31" and out.token_ids == [] and out.prompt_logprobs is None  # BOS (2) is special
    assert engine.generate([Request([30, 31], sampling=SamplingParams(max_new_tokens=2))])[0].prompt_text is None
    for bad in (
        dict(prompt_logprobs=21),
        dict(prompt_logprobs=-1),
        dict(prompt_logprobs=True),
        dict(max_new_tokens=-1),
        dict(return_prompt_text=1),
    ):
        with pytest.raises(RequestError, match=next(iter(bad))):
            SamplingParams(**bad)
