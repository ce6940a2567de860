"""The engine's benchmarks in their CI forms on a tiny model: benchmarks/gpu_check.py (the check to run on a CUDA
machine) on the CPU, its identity check passing, benchmarks/long_prompt.py and benchmarks/multitenant.py; each
writes its report, by default under results/ of the current directory, named for its short preset so that the
full run's report on record stays. The multitenant benchmark's targets are checked against hand-made results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(script: str, *args: str, cwd: Path | None = None) -> None:
    """benchmarks/``script`` with ``args`` in a child process run in ``cwd``, as a user runs it; fails the test if
    it fails."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=cwd,
    )


def test_the_gpu_check_runs_on_the_cpu(tiny_llama_dir, tmp_path):
    _run("gpu_check.py", "--device", "cpu", "--preset", "ci", "--backbone", str(tiny_llama_dir), cwd=tmp_path)
    out = tmp_path / "results" / "gpu-ci"
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["identity"]["identical"] == result["identity"]["total"] == 8
    assert {r["adapter"] for r in result["identity"]["requests"]} == {
        None,
        "pedro",
        "lora_r8_qv",
        "lora_matched",
        "ia3",
    }
    # the padded decode steps (what a GPU replays from CUDA graphs) and the plain ones give the same tokens
    assert result["identity"]["graphs"] == "padded"
    assert result["identity"]["identical_without_graphs"] == result["identity"]["graphs_equal_eager"] == 8
    assert set(result["throughput"]["summary"]) == {
        "bare",
        "pedro",
        "lora_r8_qv",
        "bare, no graphs",
        "bare, fused q/k/v and gate/up",  # the CPU's other choice: its default runs one GEMM per module
    }
    assert result["reference"]["max_logit_difference"] < 1e-3 and result["reference"]["step_p50_ms"] > 0
    assert "Token identity against PEFT generate (float32): 8 / 8" in out.with_suffix(".md").read_text()


def test_the_long_prompt_benchmark_runs(tiny_llama_dir, tmp_path):
    _run("long_prompt.py", "--preset", "smoke", "--backbone", str(tiny_llama_dir), cwd=tmp_path)
    out = tmp_path / "results" / "long_prompt-smoke"
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert set(summary) == {"bare/off", "bare/on 16", "pedro/off", "pedro/on 16"}
    assert summary["bare/off"]["steps_to_first_token"] == 1 and summary["bare/on 16"]["steps_to_first_token"] > 1
    assert all(m["worst_gap_ms"] > 0 for m in summary.values())


def test_the_multitenant_benchmark_runs(tiny_llama_dir, tmp_path):
    _run("multitenant.py", "--preset", "smoke", "--backbone", str(tiny_llama_dir), cwd=tmp_path)
    out = tmp_path / "results" / "multitenant-smoke"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "multitenant-smoke.json",
        "multitenant-smoke.md",
        "multitenant-smoke.png",
    ]
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["points"]) == {"b4-t1", "b4-t4", "b4-uniform16", "b4-zipf", "long-b2-p16"}
    methods = result["points"]["b4-t4"]["methods"]
    assert {"engine:bare", "engine:pedro", "engine:lora_r8_qv", "engine:lora_matched", "engine:ia3"} <= set(methods)
    n = result["preset"]["new_tokens"]
    for m in methods.values():
        # end to end counts all n tokens of a request over the whole call, prefill included; decode counts the
        # n - 1 decoded ones over the decode steps alone: the call is longer, so it stays under decode * n/(n-1)
        assert 0 < m["end_to_end_tok_s"] < m["decode_tok_s"] * n / (n - 1)
        assert m["end_to_end_cpu_tok_s"] > 0
    assert methods["engine:bare"]["end_to_end_tok_s_vs_bare"] == 1.0
    assert methods["engine:bare"]["end_to_end_cpu_tok_s_vs_bare"] == 1.0
    report = out.with_suffix(".md").read_text()
    assert "| end-to-end tok/s |" in report and "| end to end per CPU s |" in report
    lockstep = result["lockstep"]
    assert lockstep["point"] == "b4-t4" and set(lockstep["methods"]) == {
        "bare",
        "pedro",
        "lora_r8_qv",
        "lora_matched",
        "ia3",
    }
    for name, m in lockstep["methods"].items():
        assert m["decode_s"] > 0 and m["prefill_s"] > 0 and len(m["decode_vs_bare_per_repeat"]) == 1
        assert len(m["prefill_vs_bare_per_repeat"]) == 1 + lockstep["prefill_rounds"] == 2  # the repeat, a round
        if name == "bare":
            assert m["decode_vs_bare"] == m["prefill_vs_bare"] == m["end_to_end_vs_bare"] == 1.0
    assert "## Lockstep: b4-t4" in report
    # the targets are stated at batch 32 with 32 tenants: the smoke preset's lockstep point is named, not judged
    section = report.split("## Targets")[1].split("##")[0]
    assert "measured at b4-t4 (batch 4, 4 tenants) (lockstep)" in section
    assert "**PASS**" not in section and "**MISS**" not in section and "n/a" not in section
    assert "**not measured** PEDRO decode >= 2.5x HF PEFT mixed-batch LoRA at b32-t32" in section


def _point(**methods: dict) -> dict:
    return {"methods": methods}


def test_multitenant_targets_read_the_right_ratios():
    from multitenant import targets

    def result(pedro: float, e2e: float, prefill: float, bf16: float, fp32: float) -> dict:
        return {
            "dtype": "bfloat16",
            "points": {
                "b32-t32": _point(
                    **{
                        "engine:pedro": {
                            "decode_tok_s_vs_bare": pedro,
                            "end_to_end_tok_s_vs_bare": e2e,
                            "prefill_tok_s_vs_bare": prefill,
                            "decode_tok_s": 300.0,
                        },
                        "hf:peft_mixed_lora_r8_qv": {"decode_tok_s": 100.0},
                    }
                ),
                "b32-t1": _point(
                    **{
                        "engine:bare": {"decode_tok_s": 200.0 * bf16},
                        "hf:generate_bare": {"decode_tok_s": 200.0},
                        "engine:bare_fp32": {"decode_tok_s": 100.0 * fp32},
                        "hf:generate_bare_fp32": {"decode_tok_s": 100.0},
                    }
                ),
            },
        }

    passing = targets(result(pedro=0.98, e2e=0.95, prefill=0.95, bf16=2.0, fp32=1.3))
    assert [round(t.measured, 3) for t in passing] == [0.98, 0.95, 3.0, 2.0, 1.3, 0.95]
    assert [t.verdict for t in passing] == ["PASS"] * 6
    failing = targets(result(pedro=0.97, e2e=0.94, prefill=0.94, bf16=1.9, fp32=1.29))
    assert [t.verdict for t in failing] == ["MISS", "MISS", "PASS", "MISS", "MISS", "MISS"]
    assert failing[4].line() == (
        "- **MISS** engine bare decode >= 1.3x transformers generate (both float32) at b32-t1 (batch 32, 1 tenant): "
        "measured 1.290 (target 1.3)"
    )
    # lockstep ratios, where the benchmark measured them, take the place of the sequential runs' for PEDRO vs bare
    stepped = result(pedro=0.97, e2e=0.94, prefill=0.94, bf16=2.0, fp32=1.3)
    stepped["lockstep"] = {
        "point": "b32-t32",
        "methods": {"pedro": {"decode_vs_bare": 0.99, "end_to_end_vs_bare": 0.96, "prefill_vs_bare": 0.93}},
    }
    checks = targets(stepped)
    assert [round(t.measured, 3) for t in checks] == [0.99, 0.96, 3.0, 2.0, 1.3, 0.93]
    assert [t.verdict for t in checks] == ["PASS", "PASS", "PASS", "PASS", "PASS", "MISS"]
    assert checks[0].line() == (
        "- **PASS** PEDRO decode >= 0.98x bare backbone at b32-t32 (batch 32, 32 tenants) (lockstep): "
        "measured 0.990 (target 0.98)"
    )
    assert "(lockstep)" in checks[5].line() and "(lockstep)" not in checks[2].line()


def test_multitenant_targets_name_where_they_were_measured():
    """A short preset's lockstep runs at its own point (b4-t4): the PEDRO-vs-bare targets name that point and
    are neither met nor missed there; the targets it has no runs for are not measured, not missed."""
    from multitenant import targets

    smoke = {
        "dtype": "bfloat16",
        "points": {"b4-t4": _point(**{"engine:pedro": {"decode_tok_s_vs_bare": 1.25, "decode_tok_s": 300.0}})},
        "lockstep": {
            "point": "b4-t4",
            "methods": {"pedro": {"decode_vs_bare": 1.25, "end_to_end_vs_bare": 1.1, "prefill_vs_bare": 0.9}},
        },
    }
    checks = targets(smoke)
    verdicts = ["not comparable", "not comparable", "not measured", "not measured", "not comparable"]
    assert [t.verdict for t in checks] == verdicts
    assert checks[0].line() == (
        "- **not comparable** PEDRO decode >= 0.98x bare backbone: stated at b32-t32 (batch 32, 32 tenants), "
        "measured at b4-t4 (batch 4, 4 tenants) (lockstep): 1.250 (target 0.98)"
    )
    assert checks[2].line() == (
        "- **not measured** PEDRO decode >= 2.5x HF PEFT mixed-batch LoRA at b32-t32 (batch 32, 32 tenants) "
        "(target 2.5)"
    )
    # a result from before the lockstep runs, without the stated point: nothing measured, nothing missed
    del smoke["lockstep"]
    assert {t.verdict for t in targets(smoke)} == {"not measured"}


def test_multitenant_cpu_ratios_read_the_cpu_time_throughputs():
    from multitenant import cpu_ratios

    result = {
        "dtype": "bfloat16",
        "points": {
            "b32-t32": _point(**{"engine:pedro": {"end_to_end_cpu_tok_s_vs_bare": 0.96}}),
            "b32-t1": _point(
                **{
                    "engine:bare": {"end_to_end_cpu_tok_s": 300.0},
                    "hf:generate_bare": {"end_to_end_cpu_tok_s": 120.0},
                    "engine:bare_fp32": {"end_to_end_cpu_tok_s": 90.0},
                }
            ),
        },
    }
    ratios = cpu_ratios(result)
    assert [round(r, 3) for _, r in ratios] == [0.96, 2.5]  # no fp32 transformers run: no fp32 ratio
    assert "(bfloat16)" in ratios[1][0]
    result["points"]["b32-t1"]["methods"]["hf:generate_bare_fp32"] = {"end_to_end_cpu_tok_s": 60.0}
    assert [round(r, 3) for _, r in cpu_ratios(result)] == [0.96, 2.5, 1.5]
    result["points"]["b32-t1"]["methods"]["engine:bare_fp32_onednn"] = {"end_to_end_cpu_tok_s": 150.0}
    ratios = cpu_ratios(result)
    assert [round(r, 3) for _, r in ratios] == [0.96, 2.5, 1.5, 2.5] and "oneDNN" in ratios[3][0]


def test_engine_against_transformers_is_paired_repeat_by_repeat():
    """Two methods run seconds apart within a repeat and minutes apart across repeats: their ratio is the median
    of the per-repeat ratios, so a slow stretch of the host that hits one repeat cannot pair one side's fast
    repeat with the other's slow one (here the ratio of medians would read 1.0, the paired ratio 1.5)."""
    from multitenant import paired_ratio, targets

    engine = {"decode_tok_s": 200.0, "decode_tok_s_by_repeat": {"0": 150.0, "1": 300.0, "2": 200.0}}
    hf = {"decode_tok_s": 200.0, "decode_tok_s_by_repeat": {"0": 100.0, "1": 200.0, "2": 250.0}}
    assert paired_ratio(engine, hf, "decode_tok_s") == 1.5
    result = {
        "dtype": "bfloat16",
        "points": {"b32-t1": _point(**{"engine:bare_fp32": engine, "hf:generate_bare_fp32": hf})},
    }
    (fp32,) = [t for t in targets(result) if "float32" in t.description]
    assert fp32.measured == 1.5 and fp32.verdict == "PASS"
    # a result written before per-repeat values were kept: the ratio of the medians
    assert paired_ratio({"decode_tok_s": 300.0}, {"decode_tok_s": 200.0}, "decode_tok_s") == 1.5
    assert paired_ratio({"decode_tok_s": 300.0}, {}, "decode_tok_s") is None
