"""The dequantised GGUF backbone is cached once and later loads read the copy: same weights, same tokenizer."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.real
def test_second_load_reads_the_converted_copy(tmp_path, monkeypatch):
    import pedro
    from pedro import backbones

    monkeypatch.setenv("PEDRO_CACHE", str(tmp_path))
    first, tokenizer = pedro.load_backbone("smollm2-135m", dtype=torch.bfloat16, quiet=True)
    copies = list((tmp_path / "converted").iterdir())
    assert len(copies) == 1 and (copies[0] / "config.json").is_file() and "bfloat16" in copies[0].name
    assert "quantization_config" not in (copies[0] / "config.json").read_text()  # reloads as a plain model
    converted_from_gguf = []
    monkeypatch.setattr(backbones, "_save_converted", lambda *a: converted_from_gguf.append(a))
    second, tokenizer2 = pedro.load_backbone("smollm2-135m", dtype=torch.bfloat16, quiet=True)
    assert not converted_from_gguf  # read from the copy, not converted again
    for model in (first, second):  # plain float models: another engine can load what they save
        assert model.config.name_or_path == "smollm2-135m"  # what its adapters record, not the cache folder
        assert getattr(model, "hf_quantizer", None) is None
        assert getattr(model.config, "quantization_config", None) is None
    second.save_pretrained(tmp_path / "saved")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer2.apply_chat_template(
        messages, tokenize=False
    )
    assert tokenizer("héllo wörld")["input_ids"] == tokenizer2("héllo wörld")["input_ids"]
    assert (tokenizer2.padding_side, tokenizer2.pad_token) == ("left", tokenizer.pad_token)
    x = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(x).logits, second(x).logits)


def test_a_folder_holding_one_gguf_file_is_that_backbone(tmp_path):
    """What a model loaded from a backbone package records as its path (and so what its adapters record)."""
    from pedro.backbones import resolve_backbone

    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    assert resolve_backbone(str(tmp_path))[:2] == (tmp_path, "model.Q4_1.gguf")
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="one .gguf file"):
        resolve_backbone(str(tmp_path))


def test_a_model_loaded_from_a_path_records_it_absolute_so_its_adapters_do(tiny_llama_dir, monkeypatch):
    import pedro
    from pedro.data import Example
    from pedro.train import train

    monkeypatch.chdir(tiny_llama_dir.parent)
    model, tokenizer = pedro.load_backbone(tiny_llama_dir.name, quiet=True)
    assert model.config.name_or_path == str(tiny_llama_dir.resolve())
    examples = [Example(f"{i} plus one", f" {i + 1}") for i in range(4)]
    result = train(
        model=model, tokenizer=tokenizer, examples=examples, output_dir="run", max_steps=1, batch_size=2, progress=False
    )
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
