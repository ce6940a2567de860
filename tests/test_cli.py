import re

import torch
from conftest import randomize
from typer.testing import CliRunner

import pedro
from pedro.cli import app

runner = CliRunner()


def test_info_shows_sites_and_closed_form_count(tiny_llama_dir):
    result = runner.invoke(app, ["info", "--backbone", str(tiny_llama_dir), "--r", "4", "--targets", "q,up"])
    assert result.exit_code == 0, result.output
    model, _ = pedro.load_backbone(str(tiny_llama_dir), quiet=True)
    expected = pedro.count_trainable_parameters(pedro.PedroConfig(r=4, targets=["q", "up"]), model)
    assert f"trainable parameters: {expected:,}" in result.output
    assert "q_proj" in result.output and "up_proj" in result.output and "v_proj" not in result.output


def test_info_refuses_bad_config_values(tiny_llama_dir):
    result = runner.invoke(app, ["info", "--backbone", str(tiny_llama_dir), "--pooler", "first"])
    assert result.exit_code != 0
    assert "PedroConfig.pooler" in str(result.exception)


def test_generate_with_and_without_adapter(tiny_llama_dir, tmp_path):
    model, tokenizer = pedro.load_backbone(str(tiny_llama_dir), quiet=True)
    peft_model = pedro.get_pedro_model(model, r=4)
    randomize(peft_model, scale=1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = tokenizer(["5 6 7"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = peft_model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with peft_model.disable_adapter():
            expected_bare = peft_model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    words = tokenizer.decode(expected[0, 3:], skip_special_tokens=True).strip()
    bare_words = tokenizer.decode(expected_bare[0, 3:], skip_special_tokens=True).strip()
    assert words != bare_words  # the adapter changes the answer, so each run below is told apart
    args = ["generate", "--backbone", str(tiny_llama_dir), "-p", "5 6 7", "--max-new-tokens", "4"]
    with_adapter = runner.invoke(app, args + ["--adapter", str(tmp_path / "adapter")])
    assert with_adapter.exit_code == 0, with_adapter.output
    assert re.search(rf"> 5 6 7\s+{re.escape(words)}", with_adapter.output)
    bare = runner.invoke(app, args)
    assert bare.exit_code == 0, bare.output
    assert re.search(rf"> 5 6 7\s+{re.escape(bare_words)}", bare.output)


def test_unknown_backbone_is_a_clear_error():
    result = runner.invoke(app, ["info", "--backbone", "no-such-model"])
    assert result.exit_code != 0
    assert "neither a known name" in str(result.exception)


def test_bench_help_is_the_benchmark_scripts_own():
    result = runner.invoke(app, ["bench", "quality", "--help"])
    assert result.exit_code == 0 and "usage: quality.py" in result.output and "--methods" in result.output


def test_a_quality_report_without_runs_says_so_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["bench", "quality", "--report", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "no runs on record" in str(result.exception or result.output)
    assert list(tmp_path.iterdir()) == []
