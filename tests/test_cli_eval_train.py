"""User-facing defaults of `pedro train` and `pedro eval`: which files a data folder trains on, where
`eval --base` writes, and what the parameter-size printout claims."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from typer.testing import CliRunner

from pedro.cli import app
from pedro.data import Example, load_records
from pedro.train import TrainConfig, expected_parameter_count


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_a_data_folder_trains_on_its_train_file_only(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"prompt": "5", "response": "6"}])
    _write(folder / "test.jsonl", [{"prompt": "7", "response": "8"}] * 3)
    assert load_records(folder) == [Example("5", "6")]
    assert load_records(folder, "test") == [Example("7", "8")] * 3
    # another format holding the test split does not shadow train.jsonl
    import datasets

    datasets.Dataset.from_list([{"prompt": "7", "response": "8"}]).to_parquet(str(folder / "test.parquet"))
    assert load_records(folder) == [Example("5", "6")]
    # shards of the split are read together
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        _write(shards / f"train-0000{i}-of-00002.jsonl", [{"prompt": str(5 + i), "response": "6"}])
    _write(shards / "test.jsonl", [{"prompt": "7", "response": "8"}])
    assert sorted(e.prompt for e in load_records(shards)) == ["5", "6"]


def test_a_data_folder_without_a_train_file_is_refused_naming_its_files(tmp_path, tiny_llama_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "test.jsonl", [{"prompt": "7", "response": "8"}])
    _write(folder / "extra.jsonl", [{"prompt": "5", "response": "6"}])
    with pytest.raises(FileNotFoundError, match=r"no 'train' split.*\['extra.jsonl', 'test.jsonl'\]"):
        load_records(folder)
    result = CliRunner().invoke(
        app, ["train", "--backbone", str(tiny_llama_dir), "--data", str(folder), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code != 0 and isinstance(result.exception, FileNotFoundError)
    assert "test.jsonl" in str(result.exception)
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_eval_base_writes_under_outputs_eval_and_says_where(tmp_path, tiny_llama_dir, monkeypatch):
    task = tmp_path / "task"
    task.mkdir()
    _write(
        task / "test.jsonl", [{"prompt": f"{5 + i} 6", "response": "43", "options": ["43", "44 45"]} for i in range(3)]
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["eval", "--base", "--backbone", str(tiny_llama_dir), "--task", f"jsonl:{task}"])
    assert result.exit_code == 0, result.output
    folder = work / "outputs" / "eval" / "tiny-llama-base"
    [written] = folder.glob("eval_*_test.json")
    scores = json.loads(written.read_text())
    assert scores["n"] == 3 and scores["adapter"] is None
    assert (folder / f"{written.stem}_predictions.jsonl").is_file()
    assert [p.name for p in work.iterdir()] == ["outputs"]  # nothing else in the working directory
    assert f"wrote outputs/eval/tiny-llama-base/{written.name}" in " ".join(result.output.split())


def test_size_printout_compares_methods_only_when_matching(tmp_path, tiny_llama_dir):
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": f"{5 + i % 4} 6", "response": "43"} for i in range(4)])
    runner = CliRunner()
    common = ["train", "--backbone", str(tiny_llama_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "4"]
    result = runner.invoke(app, [*common, "--method", "ia3", "-o", str(tmp_path / "ia3")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    ia3 = expected_parameter_count(TrainConfig(method="ia3"), tiny_model("llama"))
    assert f"trainable parameters: {ia3:,} (ia3 on k,v,down)" in output
    assert "budget" not in output and "pedro" not in output and "lora" not in output

    result = runner.invoke(app, [*common, "--method", "ia3", "--match-params", "pedro", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    budget = expected_parameter_count(TrainConfig(method="pedro"), tiny_model("llama"))
    assert f"trainable parameters at this budget (--match-params: {budget:,})" in " ".join(result.output.split())
    sizes = {
        r["method"]: r for r in json.loads((tmp_path / "m" / "training_summary.json").read_text())["parameter_sizes"]
    }
    # PEDRO is the budget itself (r=8), not PEDRO shrunk to what (IA)3 reached
    assert sizes["pedro"]["size"] == "r=8" and sizes["pedro"]["vs_budget"] == 0.0
    assert sizes["ia3"]["trainable"] == pytest.approx((1 + sizes["ia3"]["vs_budget"]) * budget)


def test_eval_refuses_bad_arguments_before_loading_and_writes_into_a_given_folder(tmp_path, tiny_llama_dir):
    task = tmp_path / "task"
    task.mkdir()
    _write(task / "test.jsonl", [{"prompt": "5 6", "response": "43", "options": ["43", "44 45"]}])
    base = ["eval", "--task", f"jsonl:{task}"]
    missing = CliRunner().invoke(app, [*base, "--adapter", str(tmp_path / "no-such-adapter")])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception or missing.output)
    (tmp_path / "adapter_config.json").write_text("{}")
    a_file = CliRunner().invoke(app, [*base, "--adapter", str(tmp_path / "adapter_config.json")])
    assert a_file.exit_code != 0 and "is a file, not a folder" in str(a_file.exception or a_file.output)
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, [*base, "--adapter", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "no adapter_config.json" in str(empty.exception or empty.output)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    broken = CliRunner().invoke(app, [*base, "--adapter", str(tmp_path / "broken")])
    assert broken.exit_code != 0 and "adapter_config.json is not valid JSON" in str(broken.exception or broken.output)
    for option in ("--limit", "--batch-size"):
        refused = CliRunner().invoke(app, [*base, "--base", "--backbone", str(tiny_llama_dir), option, "0"])
        assert refused.exit_code == 2 and option in refused.output
    folder = tmp_path / "results"
    folder.mkdir()
    into = CliRunner().invoke(app, [*base, "--base", "--backbone", str(tiny_llama_dir), "--output", str(folder)])
    assert into.exit_code == 0, into.output
    [written] = folder.glob("eval_*_test.json")
    assert json.loads(written.read_text())["n"] == 1 and (folder / f"{written.stem}_predictions.jsonl").is_file()
    # a path ending in / is a folder, made when missing; a plain path is the result file
    new = CliRunner().invoke(app, [*base, "--base", "--backbone", str(tiny_llama_dir), "--output", f"{tmp_path}/new/"])
    assert new.exit_code == 0, new.output
    assert [p.name for p in (tmp_path / "new").glob("eval_*_test.json")] == [written.name]
    named = CliRunner().invoke(
        app, [*base, "--base", "--backbone", str(tiny_llama_dir), "--output", f"{tmp_path}/r.json"]
    )
    assert named.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["n"] == 1
