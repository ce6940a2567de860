"""CLI smoke test: `pedro train` a few steps on a tiny local backbone and tiny JSONL, then `pedro eval` on it."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from pedro.cli import app


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_train_then_eval(tmp_path, tiny_llama_dir):
    data = tmp_path / "task"
    data.mkdir()
    rows = [
        {"prompt": f"{5 + i % 4} {6 + i % 3}", "response": ["43", "44"][i % 2], "options": ["43", "44"]}
        for i in range(8)
    ]
    _write(data / "train.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    _write(data / "test.jsonl", rows)
    out = tmp_path / "adapter"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--backbone",
            str(tiny_llama_dir),
            "--data",
            str(data / "train.jsonl"),
            "-o",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--match-params",
            "2300",
            "--logging-steps",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trainable parameters at this budget" in result.output and "8/8 records kept" in result.output
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["r"] != 8  # r chosen to match the 2300 budget
    assert abs(summary["trainable_parameters"] / 2300 - 1) <= 0.05
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEDRO" and config["base_model_name_or_path"] == str(tiny_llama_dir)

    # the backbone comes from the adapter's config
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--task", f"jsonl:{data}", "--split", "test"])
    assert result.exit_code == 0, result.output
    scores = json.loads((out / f"eval_jsonl_{str(data).replace('/', '_')}_test.json").read_text())
    assert scores["n"] == 8 and 0.0 <= scores["accuracy"] <= 1.0
    predictions = [json.loads(line) for line in open(scores["predictions"])]
    assert scores["accuracy"] == sum(p["correct"] for p in predictions) / 8

    result = runner.invoke(app, ["eval", "--task", f"jsonl:{data}"])  # neither --adapter nor --base
    assert result.exit_code != 0


def test_bad_data_is_a_clear_error(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "5", "response": "6"}\n{"prompt": "5", "response": 6\n')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pedro.cli",
            "train",
            "--backbone",
            str(tiny_llama_dir),
            "--data",
            str(bad),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    stderr = " ".join(run.stderr.split())  # rich wraps long lines
    assert run.returncode == 2
    assert "bad.jsonl:2: not valid JSON" in stderr and "Traceback" not in stderr
    assert "Loading backbone" not in stderr  # the data is checked before the backbone is loaded
