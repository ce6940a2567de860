"""The benchmarks' shared pieces: where a report goes by default, one percentile definition, the order of a
lockstep's steps, and the load benchmark driving a real server through the same helpers as the server tests (its
smoke preset, end to end)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import default_out, lockstep_turns, percentile  # noqa: E402


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


def test_lockstep_rounds_rotate_and_skip_the_finished():
    steps_left = {"a": 1, "b": 3, "c": 2}
    order = []
    for name in lockstep_turns(list(steps_left), lambda n: steps_left[n] > 0, first=1):
        order.append(name)
        steps_left[name] -= 1
    # rounds start one further along each time, from the configuration given: b c a, c b (a done), b
    assert order == ["b", "c", "a", "c", "b", "b"]


def test_reports_go_under_results_of_the_current_directory_named_for_a_short_preset():
    assert default_out("serve", "default", recorded="default") == Path("results/serve")
    assert default_out("multitenant", "smoke", recorded="full") == Path("results/multitenant-smoke")
    assert default_out("train_speed") == Path("results/train_speed")
    assert default_out("train_speed", "quick") == Path("results/train_speed-quick")
    assert not default_out("gpu", "ci", recorded="full").is_absolute()


def test_the_serve_benchmark_runs_end_to_end(tmp_path):
    """Run elsewhere than the checkout, its smoke preset writes results/serve-smoke.* there, and nothing else."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--preset", "smoke"],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=tmp_path,
    )
    out = tmp_path / "results"
    assert sorted(p.name for p in out.iterdir()) == ["serve-smoke.json", "serve-smoke.md", "serve-smoke.png"]
    summary = json.loads((out / "serve-smoke.json").read_text())["summary"]
    assert set(summary) == {"base", "pedro", "lora"}
    assert all(s["requests"] > 0 and s["errors"] == 0 for s in summary.values())


def test_the_quality_study_defaults_to_results_of_the_current_directory(tmp_path, monkeypatch):
    """As an absolute path: from the repository's root, the very folder (and path strings) a study resumes from."""
    import quality

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no runs on record") as exit:
        quality.main(["--report"])
    assert f"in {tmp_path / 'results' / 'quality_runs.jsonl'}:" in str(exit.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "results"]


def test_the_trec_label_words_default_to_results_of_the_current_directory(tmp_path, monkeypatch):
    import trec_label_words

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trec_label_words.pedro, "load_backbone", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(trec_label_words, "dev_questions", lambda *a: [])
    monkeypatch.setattr(trec_label_words, "score", lambda *a: {"accuracy": 0.5, "macro_f1": 0.5})
    trec_label_words.main([])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["trec_label_words.json", "trec_label_words.md"]


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
    mine = (tmp_path / "trec-lora_matched-0").read_text().split()
    assert mine[0] == str(os.getpid())
    if sys.platform == "linux":  # a claim names its process by pid and start time
        assert len(mine) == 2 and mine[1].isdigit()
        # a claim from an earlier boot whose pid a live, unrelated process now has: not held
        (tmp_path / "trec-ia3-0").write_text(f"{os.getpid()} {int(mine[1]) + 1}")
        assert quality.claim(tmp_path, ("trec", "ia3", 0))


def test_quality_report_pairs_each_pedro_configuration_with_its_baselines_on_record(tmp_path) -> None:
    """Only methods with runs appear; each PEDRO configuration is compared with the baselines it is paired with
    (the default with matched LoRA, the half budget with LoRA matched to it), on the seeds both have."""
    from types import SimpleNamespace

    import quality

    task = SimpleNamespace(metric="accuracy", kind="choice")
    items = list(range(10))

    def run(method: str, seed: int, correct: str, cpu: float | None = None, wall: float | None = 600.0) -> dict:
        return {
            "task": "toy",
            "method": method,
            "seed": seed,
            "n": 10,
            "trainable": 100,
            "epochs": 1,
            "lr": 1e-3,
            "train_seconds": wall,  # None: a run resumed from a checkpoint that did not record its times
            "train_cpu_seconds": cpu,
            "correct": correct,
            "accuracy": correct.count("1") / 10,
        }

    records = [
        run("zero_shot", 0, "1000000000"),
        run("pedro", 0, "1111111100", cpu=240.0),
        run("pedro", 1, "1111111110", cpu=360.0),
        run("lora_matched", 0, "1111110000", cpu=120.0),
        run("lora_matched", 1, "1111111000"),
        run("lora_matched", 2, "1111111111", wall=None),  # no PEDRO run of seed 2: left out of the pairing
        run("pedro_r4", 0, "1111100000"),
        run("lora_matched_r4", 0, "1111111000"),
    ]
    table = quality.aggregate(records, {"toy": (task, items)}, rounds=200)
    versus = table["toy"]["versus"]
    assert set(versus) == {"pedro - lora_matched", "pedro_r4 - lora_matched_r4"}
    assert versus["pedro - lora_matched"]["seeds"] == [0, 1]
    assert math.isclose(versus["pedro - lora_matched"]["difference"], (0.8 + 0.9) / 2 - (0.6 + 0.7) / 2)
    assert math.isclose(versus["pedro_r4 - lora_matched_r4"]["difference"], 0.5 - 0.7)
    low, high = versus["pedro - lora_matched"]["bootstrap95"]
    assert low <= 0.2 <= high
    meta = dict(
        command="c", precision="bf16 (6 runs)", seeds="0,1", default_lr={}, runs=8, run_minutes=8, threads=1, rounds=200
    )
    text = quality.markdown(table, meta)
    header = next(line for line in text.splitlines() if line.startswith("| task (metric"))
    assert header.split(" | ")[2:] == ["pedro", "lora_matched", "pedro_r4", "lora_matched_r4 |"]
    assert "| toy | +20.0 [" in text and "pedro_r4 − lora_matched_r4" in text and "ia3" not in text
    # where PEDRO stands, read off each pair's interval: holding 0 is level, wholly under 0 is below
    assert quality.standing(table, "pedro - lora_matched") == {"above": [], "level": ["toy"], "below": []}
    versus["pedro_r4 - lora_matched_r4"]["bootstrap95"] = [-0.4, -0.05]
    assert quality.standing(table, "pedro_r4 - lora_matched_r4") == {"above": [], "level": [], "below": ["toy"]}
    text = quality.markdown(table, meta)
    assert "pedro against lora_matched: at or above within the interval on 1 of 1 tasks (level: toy (2 seeds))." in text
    assert (
        "pedro_r4 against lora_matched_r4: at or above within the interval on 0 of 1 tasks (below: toy (1 seed))."
        in text
    )
    quality.plot(table, tmp_path / "quality.png")  # one-seed cells (no interval) and both pairs drawn
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")
    # train time per run: the wall mean, and the CPU mean over the runs that recorded it, saying how many
    assert (
        "| toy | 100; 1 ep; lr 0.001; 10 min (CPU 5 min) | 100; 1 ep; lr 0.001; 10 min, 2 of 3 runs (CPU 2 min, 1 of 3 runs) |"
        in text
    )


def test_the_bootstrap_of_a_corpus_metric_adds_item_statistics_and_agrees_with_rescoring():
    """E2E's BLEU on each resample from summed per-item statistics gives the interval that re-scoring every
    resample's texts gives (the same resamples: same seed)."""
    import quality

    from pedro.data import Example
    from pedro.tasks.e2e import E2E

    class Rescored(E2E):
        def item_statistics(self, predictions, examples):
            return None

    rng = random.Random(5)
    words = "the cafe near the river serves cheap food family friendly".split()

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randrange(4, 10)))

    examples = [Example("p", text(), references=[text(), text()]) for _ in range(30)]
    runs = [
        {"predictions": [e.references[i % 2] if (i + s) % 3 else text() for i, e in enumerate(examples)]}
        for s in range(4)
    ]
    fast = quality.paired_bootstrap(E2E(), examples, runs[:2], runs[2:], rounds=50)
    slow = quality.paired_bootstrap(Rescored(), examples, runs[:2], runs[2:], rounds=50)
    assert fast == pytest.approx(slow, abs=1e-9) and fast[0] < fast[1]
