"""The prompt format an adapter was trained with travels in its weights file's metadata (pedro.io)."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

import pedro
from pedro.data import prompt_format
from pedro.engine import AdapterError, Engine
from pedro.io import PROMPT_FORMAT_KEY, WEIGHTS_NAME, read_prompt_format, record_prompt_format, save_adapter_atomic


def _adapter():
    model = pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=4))
    randomize(model, seed=2)
    return model


def test_training_records_how_it_encoded_prompts_and_peft_still_loads_the_adapter(tmp_path):
    tokenizer = tiny_tokenizer()
    assert prompt_format(tokenizer) == "raw"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prompt_format(tokenizer) == "chat_template"
    model = _adapter()
    save_adapter_atomic(model, tmp_path / "a", prompts=prompt_format(tokenizer))
    assert read_prompt_format(tmp_path / "a") == "chat_template"
    restored = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a"))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)
    save_adapter_atomic(model, tmp_path / "b")
    assert read_prompt_format(tmp_path / "b") is None
    engine = Engine(tiny_model("llama"), tokenizer, max_batch=2, max_seq_len=32)
    engine.add_adapter("a", tmp_path / "a")
    engine.add_adapter("b", tmp_path / "b")
    assert (engine.prompt_format("a"), engine.prompt_format("b")) == ("chat_template", None)


def test_bad_prompt_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        record_prompt_format(tmp_path, "jinja")
    _adapter().save_pretrained(str(tmp_path / "a"))
    weights = tmp_path / "a" / WEIGHTS_NAME
    save_file(load_file(str(weights)), str(weights), metadata={PROMPT_FORMAT_KEY: "jinja"})
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=32)
    with pytest.raises(AdapterError, match="expected one of"):
        engine.add_adapter("a", tmp_path / "a")
