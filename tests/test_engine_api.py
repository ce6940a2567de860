"""The engine's public surface beyond generate(): prompt encoding, the adapter dry run, the bounded queue, and
running in bfloat16 (checked against transformers' own bf16 forward, token by token)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer

import pedro
from pedro.backbones import resolve_dtype
from pedro.data import encode_prompt
from pedro.engine import AdapterError, Engine, QueueFull, Request, RequestError, SamplingParams

CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"


def _sharp_model(dtype=torch.float32):
    """The tiny LLaMA with a scaled-up LM head: confident next tokens, so a wrong token cannot hide in a near-tie."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.to(dtype)


def _pedro_dir(tmp_path, model=None, seed=1):
    peft_model = pedro.get_pedro_model(model or _sharp_model(), pedro.PedroConfig(r=4))
    randomize(peft_model, seed=seed, scale=0.5)
    path = tmp_path / f"pedro-{seed}"
    peft_model.save_pretrained(str(path))
    return str(path)


def test_encode_matches_the_tokenizer_and_refuses_bad_prompts():
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model("llama"), tokenizer, max_batch=2, max_seq_len=16)
    assert engine.encode("5 6 7", raw_prompt=True) == tokenizer("5 6 7")["input_ids"] == [5, 6, 7]
    assert engine.encode([9, 8]) == [9, 8]
    messages = [{"role": "user", "content": "5 6"}, {"role": "user", "content": "7"}]
    assert engine.encode(messages) == encode_prompt(tokenizer, messages) == [5, 6, 7]  # as training encodes it
    tokenizer.chat_template = CHAT
    expected = tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": "5 6"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert engine.encode([{"role": "user", "content": "5 6"}]) == expected
    assert engine.encode("5 6") == expected and engine.encode("5 6", raw_prompt=True) == [5, 6]
    for bad, message in (
        ("", "empty"),
        ([], "empty"),
        ([5, 10**6], r"in \[0, "),
        ({"x": 1}, "must be a string"),
        (" ".join(["5"] * 16), r"16 tokens; at most 15 are allowed \(the context is 16"),
    ):
        with pytest.raises(RequestError, match=message):
            engine.encode(bad, raw_prompt=True)


def test_check_adapter_is_a_dry_run(tmp_path):
    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=16)
    good = _pedro_dir(tmp_path)
    described = engine.check_adapter(good)
    assert described == {
        "kind": "pedro",
        "parameters": pedro.count_trainable_parameters(pedro.PedroConfig(r=4), tiny_model("llama")),
    }
    assert engine.list_adapters() == []  # nothing registered
    wide = _pedro_dir(tmp_path, tiny_model("llama", hidden_size=48), seed=2)
    with pytest.raises(AdapterError, match=r"but \(4, 32\) on this backbone"):
        engine.check_adapter(wide)
    with pytest.raises(AdapterError, match="not an adapter directory"):
        engine.check_adapter(tmp_path)
    with pytest.raises(AdapterError, match="a file, not an adapter directory"):
        engine.check_adapter(Path(good) / "adapter_config.json")
    engine.add_adapter("p", good)  # the dry run left the name free
    assert [a["name"] for a in engine.list_adapters()] == ["p"]


def test_bounded_queue_refuses_beyond_max_waiting_and_recovers():
    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=32, max_waiting=1)
    long = SamplingParams(max_new_tokens=6, ignore_eos=True)
    for i in range(3):  # 2 fill the free rows at the next step, 1 waits
        engine.add_request(Request([5 + i, 6], sampling=long, request_id=f"r{i}"))
    assert (engine.num_running, engine.num_waiting) == (0, 3)
    with pytest.raises(QueueFull, match="1 requests waiting"):
        engine.add_request(Request([5, 6], sampling=long, request_id="over"))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    with pytest.raises(QueueFull):
        engine.add_request(Request([5, 6], sampling=long, request_id="still-over"))
    while engine.has_unfinished():
        engine.step()
    assert (engine.num_running, engine.num_waiting) == (0, 0)
    [out] = engine.generate([Request([5, 6], sampling=long, request_id="after")])
    assert out.error is None and len(out.token_ids) == 6
    with pytest.raises(ValueError, match="max_waiting"):
        Engine(tiny_model("llama"), max_waiting=-1)


def test_generate_outputs_are_whole_deltas_and_step_deltas_add_up():
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=32)
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    [out] = engine.generate([Request([5, 6, 7], sampling=sampling)])
    assert out.delta_token_ids == out.token_ids and len(out.token_ids) == 6 and out.delta_text == out.text != ""
    engine.add_request(Request([5, 6, 7], sampling=sampling), track_text=True)
    steps = []
    while engine.has_unfinished():
        steps += engine.step()
    assert sum((s.delta_token_ids for s in steps), []) == out.token_ids
    assert "".join(s.delta_text for s in steps) == out.text


def test_dtype_names_and_the_loaded_model_is_never_cast_in_place():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cast the model first"):
        Engine(model, dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.float32


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("native_cpu_bf16", [False, True])
def test_auto_dtype_follows_the_device_the_model_runs_on(monkeypatch, tiny_llama_dir, cuda, native_cpu_bf16):
    """ "auto" is bf16 on the CPU only when the CPU has native bf16 matmuls, whatever GPU the machine has: the
    engine runs on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(pedro.backbones, "_cpu_has_native_bf16", lambda: native_cpu_bf16)
    cpu = torch.bfloat16 if native_cpu_bf16 else torch.float32
    assert resolve_dtype("auto") is cpu and resolve_dtype("auto", "cpu") is cpu
    assert resolve_dtype("auto", "cuda") is (torch.bfloat16 if cuda else torch.float32)
    assert (
        resolve_dtype("auto", "cuda:0") is resolve_dtype("auto", torch.device("cuda")) is resolve_dtype("auto", "cuda")
    )
    engine = Engine(str(tiny_llama_dir), max_batch=1, max_seq_len=8, dtype="auto")
    assert engine.dtype is cpu and next(engine.model.parameters()).device.type == "cpu"


def test_bfloat16_engine_follows_transformers_bf16_forward(tmp_path):
    """bf16 is not bit-exact across kernels, so instead of token identity: every token the bf16 engine picks
    (PEDRO, LoRA and bare rows in one batch) is, under transformers' bf16 forward of the same PEFT model over
    the same prefix, the argmax or within bf16 rounding of it."""
    lora = peft.get_peft_model(_sharp_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    lora.save_pretrained(str(tmp_path / "lora"))
    dirs = {"pedro": _pedro_dir(tmp_path), "lora": str(tmp_path / "lora"), None: None}
    engine = Engine(_sharp_model(torch.bfloat16), max_batch=6, max_seq_len=40)
    for name, path in dirs.items():
        if name:
            engine.add_adapter(name, path)
    requests = [
        Request(
            [3 + i, 7, 11 + 2 * i, 5][: 2 + i % 3],
            adapter=a,
            sampling=SamplingParams(max_new_tokens=10, ignore_eos=True),
        )
        for i, a in enumerate([*dirs, *dirs])
    ]
    outs = engine.generate(requests)
    for request, out in zip(requests, outs):
        model = _sharp_model(torch.bfloat16)
        if request.adapter:
            model = peft.PeftModel.from_pretrained(model, dirs[request.adapter])
        ids = torch.tensor([request.prompt + out.token_ids])
        n = len(request.prompt)
        with torch.inference_mode():
            kwargs = {"prompt_lengths": torch.tensor([n])} if request.adapter == "pedro" else {}
            logits = model(input_ids=ids, **kwargs).logits[0, n - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        gap = logits.max(-1).values - chosen
        assert (gap <= 0.05 * logits.abs().max(-1).values).all(), (request.adapter, gap)
        assert (gap == 0).float().mean() >= 0.8


def test_a_named_backbone_loads_in_the_asked_dtype(tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), max_batch=2, max_seq_len=16, dtype="bfloat16")
    assert engine.dtype is torch.bfloat16 and next(engine.model.parameters()).dtype is torch.bfloat16
    [out] = engine.generate([Request([5, 6, 7], sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))])
    assert out.error is None and len(out.token_ids) == 3


def test_listed_bytes_follow_each_adapter_kind_resident_dtype(tmp_path):
    """PEDRO generators stay in fp32 whatever the backbone's dtype; LoRA weights take the engine's dtype."""
    model = _sharp_model(torch.bfloat16)
    engine = Engine(model, max_batch=2, max_seq_len=16)
    engine.add_adapter("p", _pedro_dir(tmp_path, _sharp_model()))
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    engine.add_adapter("l", str(tmp_path / "lora"))
    listed = {a["name"]: a for a in engine.list_adapters()}
    assert listed["p"]["bytes"] == 4 * listed["p"]["parameters"]
    assert listed["l"]["bytes"] == 2 * listed["l"]["parameters"]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_families_the_runner_does_not_implement_are_refused_by_name(family):
    """The PEFT model serves them through transformers' forward (test_pedro_model.py); the engine says so."""
    with pytest.raises(ValueError, match=rf"runner supports \['llama'.*not '{family}'; use transformers generate"):
        Engine(tiny_model(family), max_batch=1, max_seq_len=16)
