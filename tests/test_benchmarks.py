"""The benchmarks' shared pieces: one percentile definition, and the load benchmark driving a real server through
the same helpers as the server tests (its smoke preset, end to end)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import percentile  # noqa: E402


@pytest.mark.parametrize(
    "values, q, expected",
    [
        ([5.0], 99, 5.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        (list(map(float, range(1, 101))), 99, 99.0),
        (list(map(float, range(1, 101))), 100, 100.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 25, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 26, 2.0),
    ],
)
def test_percentile_is_the_nearest_rank(values, q, expected):
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


def test_the_serve_benchmark_runs_end_to_end(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--preset", "smoke", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "serve.json").read_text())["summary"]
    assert set(summary) == {"base", "pedro", "lora"}
    assert all(s["requests"] > 0 and s["errors"] == 0 for s in summary.values())
    assert (tmp_path / "serve.md").is_file() and (tmp_path / "serve.png").is_file()


def test_study_claims_let_processes_share_a_folder_and_resume_after_a_crash(tmp_path: Path) -> None:
    import os

    import quality

    key = ("trec", "pedro", 1)
    assert quality.claim(tmp_path, key)
    assert not quality.claim(tmp_path, key)  # held by a live process (this one)
    assert quality.claim(tmp_path, ("trec", "pedro", 2))  # another run is free
    quality.release(tmp_path, key)
    assert quality.claim(tmp_path, key)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "trec-lora_matched-0").write_text(dead.stdout.strip())  # its process has exited
    assert quality.claim(tmp_path, ("trec", "lora_matched", 0))
    assert (tmp_path / "trec-lora_matched-0").read_text() == str(os.getpid())
