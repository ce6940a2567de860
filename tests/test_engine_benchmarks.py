"""The engine's device and long-prompt benchmarks in their CI forms on a tiny model: benchmarks/gpu_check.py (the
check to run on a CUDA machine) on the CPU, its identity check passing, and benchmarks/long_prompt.py; both write
their reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    """benchmarks/``script`` with ``args`` in a child process, as a user runs it; fails the test if it fails."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, capture_output=True, timeout=600
    )


def test_the_gpu_check_runs_on_the_cpu(tiny_llama_dir, tmp_path):
    out = tmp_path / "gpu"
    _run("gpu_check.py", "--device", "cpu", "--preset", "ci", "--backbone", str(tiny_llama_dir), "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["identity"]["identical"] == result["identity"]["total"] == 8
    assert {r["adapter"] for r in result["identity"]["requests"]} == {
        None,
        "pedro",
        "lora_r8_qv",
        "lora_matched",
        "ia3",
    }
    assert set(result["throughput"]["summary"]) == {"bare", "pedro", "lora_r8_qv"}
    assert "Token identity against PEFT generate (float32): 8 / 8" in out.with_suffix(".md").read_text()


def test_the_long_prompt_benchmark_runs(tiny_llama_dir, tmp_path):
    out = tmp_path / "long"
    _run("long_prompt.py", "--preset", "smoke", "--backbone", str(tiny_llama_dir), "--out", str(out))
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert set(summary) == {"bare/off", "bare/on 16", "pedro/off", "pedro/on 16"}
    assert summary["bare/off"]["steps_to_first_token"] == 1 and summary["bare/on 16"]["steps_to_first_token"] > 1
    assert all(m["worst_gap_ms"] > 0 for m in summary.values())
