import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize, tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file

import pedro
from pedro import AdapterFileError, PedroConfig

IDS = torch.tensor([[5, 17, 33, 2, 60, 9, 41]])


def _saved_adapter(tmp_path, config=None, seed=1):
    model = pedro.get_pedro_model(tiny_model("llama"), config or PedroConfig(r=4, pooler="attention"))
    randomize(model, seed=seed)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_save_writes_peft_files_and_reloads_bit_exactly_in_a_fresh_process(tmp_path):
    model, adapter = _saved_adapter(tmp_path)
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) > 0 and all(".pedro_" in key for key in tensors)
    assert not any(".default." in key for key in tensors)  # the adapter's name is not baked into the file
    tiny_model("llama").save_pretrained(tmp_path / "base")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    script = textwrap.dedent(
        f"""
        import torch, pedro
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(adapter)!r})
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_shared_generator_and_a_second_adapter_round_trip(tmp_path):
    shared, shared_dir = _saved_adapter(tmp_path / "a", PedroConfig(r=3, share_generator=True), seed=2)
    other, other_dir = _saved_adapter(tmp_path / "b", PedroConfig(r=2, targets=["k", "gate"]), seed=3)
    with torch.no_grad():
        expected_shared = shared(input_ids=IDS).logits
        expected_other = other(input_ids=IDS).logits
    model = PeftModel.from_pretrained(tiny_model("llama"), shared_dir)
    model.load_adapter(other_dir, adapter_name="other")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected_shared)
        model.set_adapter("other")
        assert torch.equal(model(input_ids=IDS).logits, expected_other)


def test_loading_onto_another_hidden_size_names_both_shapes(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    wider = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match=r"shape \(4, 32\) in the file but \(4, 48\) on this backbone"):
        PeftModel.from_pretrained(wider, adapter)


def test_a_config_that_does_not_describe_the_weights_is_named_as_such(tmp_path):
    """An adapter_config.json with another r than its weights is a mixed-up config, not another backbone."""
    _, adapter = _saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(ValueError, match=r"the weights have r=4 and the config says r=2") as caught:
        PeftModel.from_pretrained(tiny_model("llama"), adapter)
    assert "different backbone" not in str(caught.value)
    from pedro.engine import AdapterError, Engine

    engine = Engine(tiny_model("llama"), max_batch=2, max_seq_len=32)
    with pytest.raises(AdapterError, match=r"the weights have r=4 and the config says r=2"):
        engine.add_adapter("mixed", str(adapter))


def test_missing_tensors_fail_clearly(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)
    with pytest.raises(ValueError, match="1 missing tensor"):
        PeftModel.from_pretrained(tiny_model("llama"), adapter)


def test_loading_onto_a_backbone_with_other_layers_names_both_counts(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    layers = tiny_model("llama").config.num_hidden_layers
    shallower = tiny_model("llama", num_hidden_layers=layers - 1)
    with pytest.raises(ValueError, match=rf"tensors for {layers} layers .* this backbone has {layers - 1}"):
        PeftModel.from_pretrained(shallower, adapter)
    from pedro.engine import AdapterError, Engine

    with pytest.raises(AdapterError, match=rf"layer {layers - 1}.*the backbone has {layers - 1} layers"):
        Engine(tiny_model("llama", num_hidden_layers=layers - 1), max_batch=2, max_seq_len=32).check_adapter(adapter)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file_fails_clearly(tmp_path, damage):
    _, adapter = _saved_adapter(tmp_path)
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}[damage])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is not a valid safetensors file"):
        PeftModel.from_pretrained(tiny_model("llama"), adapter)


def test_pickle_checkpoints_are_refused(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle checkpoints are not loaded"):
        PeftModel.from_pretrained(tiny_model("llama"), adapter)
