"""pedro.train: what the pooler sees during Trainer steps, parameter matching, the rational learning rate,
atomic checkpoints and exact resume after a real SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from transformers import TrainerCallback

from pedro.data import Collator, Example
from pedro.generator import VectorGenerator
from pedro.train import TrainConfig, expected_parameter_count, match_sizes, train
from pedro.trainer import COMPLETE

TESTS = Path(__file__).parent
# prompt words 3..9, response words 43..49 (the tiny tokenizer's 0/1/2 are pad/eos/unk)
EXAMPLES = [
    Example(" ".join(str(3 + (i + j) % 7) for j in range(2 + i % 4)), f"{43 + i % 7} {44 + i % 5}") for i in range(8)
]


class CaptureGeneratorInputs(TrainerCallback):
    """Hooks every vector generator at train begin: records (input_ids of the batch, pooled mask)."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ids: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def remember_ids(module, a, kw):
            self.ids = kw["input_ids"]

        model.register_forward_pre_hook(remember_ids, with_kwargs=True)
        for module in model.modules():
            if isinstance(module, VectorGenerator):
                module.register_forward_hook(lambda m, inputs, out: self.seen.append((self.ids, inputs[1])))


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooler_sees_only_prompt_tokens_in_trainer_steps(tmp_path, side):
    capture = CaptureGeneratorInputs()
    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=4,
        padding_side=side,
        progress=False,
        callbacks=[capture],
    )
    assert result.summary["steps"] == 3
    assert len(capture.seen) == 3 * 3  # 3 steps x 3 layers
    for ids, mask in capture.seen:
        # independent of prompt_lengths: the prompt is exactly the words 3..9 of each row
        assert torch.equal(mask, (ids >= 3) & (ids <= 9))
        assert (ids >= 43).any()  # the response is in the sequence, just not in the pool


def test_summary_log_and_adapter_round_trip(tmp_path):
    import peft

    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        output_dir=str(tmp_path),
        max_steps=4,
        batch_size=2,
        lr=5e-3,
        logging_steps=1,
        progress=False,
    )
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"]["kept"] == 8 and summary["trainable_parameters"] == 3384
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(r["tokens_per_s"] > 0 for r in log)
    assert not list(tmp_path.glob(".*"))  # no staging leftovers
    trained = result.summary
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "up.weight" in k)  # training moved Up off zero
    assert trained["method"] == "pedro" and str(loaded.peft_config["default"].peft_type) == "PEDRO"


def test_match_params_within_5_percent_of_pedro():
    model = tiny_model("llama")
    pedro_cfg = TrainConfig(method="pedro", r=8)
    budget = expected_parameter_count(pedro_cfg, model)
    lora, target = match_sizes(TrainConfig(method="lora", match_params="pedro", r=8), model)
    assert target == budget == 3384
    assert abs(expected_parameter_count(lora, model) / budget - 1) <= 0.05
    # the closed forms equal what peft actually builds
    from pedro.train import attach_adapter

    built = attach_adapter(tiny_model("llama"), lora).get_nb_trainable_parameters()[0]
    assert built == expected_parameter_count(lora, model)
    ia3 = TrainConfig(method="ia3", ia3_targets=("q", "k", "down"))
    assert attach_adapter(tiny_model("llama"), ia3).get_nb_trainable_parameters()[0] == expected_parameter_count(
        ia3, model
    )
    # PEDRO sized to a LoRA budget, and (IA)3 to the closest module subset it can reach
    pedro_matched, _ = match_sizes(TrainConfig(method="pedro", match_params=str(20 * 336)), model)
    assert abs(expected_parameter_count(pedro_matched, model) / (20 * 336) - 1) <= 0.05
    ia3_matched, _ = match_sizes(TrainConfig(method="ia3", match_params="300"), model)
    assert expected_parameter_count(ia3_matched, model) == 288  # 3 layers x (q 32 + k 16 + v 16 + o 32); closest


def test_rational_coefficients_get_their_own_learning_rate(tmp_path):
    seen = {}

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["groups"] = [
                (g["lr"], len(g["params"]), g.get("pedro_rational", False)) for g in optimizer.param_groups
            ]

    train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        output_dir=str(tmp_path),
        max_steps=1,
        batch_size=2,
        activation="rational",
        rational_lr=1e-6,
        lr=1e-3,
        scheduler="constant",
        warmup=0,
        progress=False,
        callbacks=[Peek()],
    )
    rational = [g for g in seen["groups"] if g[2]]
    assert rational == [(1e-6, 3 * 2, True)]  # numerator and denominator of each of 3 layers
    assert all(lr == 1e-3 for lr, _, flag in seen["groups"] if not flag)


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model, tiny_tokenizer
    from test_train import EXAMPLES
    from transformers import TrainerCallback
    from pedro.train import train

    class StallAfter(TrainerCallback):
        # stall once past step N, so the parent can SIGKILL us after checkpoint-N is on disk
        def on_step_end(self, args, state, control, **kwargs):
            if {stall} and state.global_step > {n}:
                print("stalling", flush=True)
                time.sleep(600)

    train(model=tiny_model("llama"), tokenizer=tiny_tokenizer(), examples=EXAMPLES,
          output_dir={out!r}, max_steps={steps}, save_steps={n}, logging_steps=1, batch_size=2, lr=5e-3, seed=3,
          activation="rational", rational_lr=1e-4, resume={resume}, progress=False, callbacks=[StallAfter()])
    """
)


def _child(out: Path, steps: int, n: int, stall: bool, resume: bool) -> subprocess.Popen:
    code = CHILD.format(tests=str(TESTS), out=str(out), steps=steps, n=n, stall=stall, resume=resume)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_equals_straight_run(tmp_path):
    n = 3  # 2N = 6 steps over 8 records in batches of 2: crosses an epoch boundary
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = _child(straight, 2 * n, n, stall=False, resume=False)
    victim = _child(killed, 2 * n, n, stall=True, resume=False)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    deadline = time.time() + 300
    while victim.poll() is None and not (killed / "checkpoints" / f"checkpoint-{n}").is_dir():
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    lines = []
    while not lines or "stalling" not in lines[-1]:  # wait until the victim is past step N
        lines.append(victim.stdout.readline())
        assert lines[-1] or victim.poll() is None, "".join(lines)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{n}"]
    # the checkpoint's mark carries the training time so far; make it long, so the resumed run's total must
    # include it (a resumed run reporting only its own piece would read a few seconds)
    mark = killed / "checkpoints" / f"checkpoint-{n}" / COMPLETE
    spent = json.loads(mark.read_text())
    assert 0 < spent["train_seconds"] < 300 and 0 < spent["train_cpu_seconds"] < 600
    mark.write_text(json.dumps({"train_seconds": 1000.0, "train_cpu_seconds": 2000.0}))
    # what a kill during a checkpoint's write leaves: a newer checkpoint folder Trainer never finished
    partial = killed / "checkpoints" / f"checkpoint-{n + 1}"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half a file")
    resumed = _child(killed, 2 * n, n, stall=False, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary = json.loads((killed / "training_summary.json").read_text())
    assert summary["steps"] == 2 * n and summary["resumed_from"].endswith(f"checkpoint-{n}")
    assert 1000 < summary["train_seconds"] < 1300 and 2000 < summary["train_cpu_seconds"] < 2600
    assert not partial.exists()  # the partial checkpoint was skipped and removed
    # and the weights did change between the checkpoint and the end (the test could not pass by accident)
    mid = load_file(killed / "checkpoints" / f"checkpoint-{n}" / "adapter_model.safetensors")
    assert any(not torch.equal(mid[k], b[k]) for k in b)
    # the whole run's mean loss (logged every step here, so exactly the straight run's), not its last piece's
    whole = json.loads((straight / "training_summary.json").read_text())["train_loss"]
    assert math.isclose(summary["train_loss"], whole, rel_tol=1e-6) and summary["tokens_per_second"] > 0
    # resumed once more, from the last step: no step runs, and nothing is reported as if one had
    again = _child(killed, 2 * n, n, stall=False, resume=True)
    assert again.wait(timeout=300) == 0, again.stdout.read()
    summary = json.loads((killed / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{2 * n}") and summary["tokens_per_second"] is None
    assert math.isclose(summary["train_loss"], whole, rel_tol=1e-6)
    again = load_file(killed / "adapter_model.safetensors")
    assert summary["steps"] == 2 * n and all(torch.equal(a[k], again[k]) for k in a)  # no step beyond the run's


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path):
    # lr 0: the eval loss never improves, so patience 1 stops training at the second evaluation
    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        eval_examples=EXAMPLES[:4],
        output_dir=str(tmp_path),
        max_steps=10,
        batch_size=2,
        lr=0.0,
        eval_steps=1,
        early_stopping=1,
        progress=False,
    )
    assert result.summary["steps"] == 2
    assert "eval_loss" in result.summary["final_metrics"]
    with pytest.raises(ValueError, match="early_stopping needs held-out data"):
        train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=EXAMPLES,
            output_dir=str(tmp_path / "x"),
            early_stopping=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="PedroConfig.pooler"):
        TrainConfig(pooler="median")


@pytest.mark.real
def test_real_smollm2_boundary_and_a_short_run(tmp_path):
    """On the real backbone and its chat template: the prompt part of a row is what inference encodes, the
    supervised part decodes to the response + the template's end-of-turn, and a short run lowers the loss on its
    rows below the backbone's (the adapter starts as the identity)."""
    import pedro
    from pedro.data import tokenize_examples
    from pedro.demo import tenant_datasets

    model, tokenizer = pedro.load_backbone("smollm2-135m", quiet=True)
    data = tenant_datasets()["acme"]
    examples = [Example(r["prompt"], r["response"]) for r in data["train"][:8]]
    rows, _ = tokenize_examples(examples, tokenizer, max_length=128)
    for example, row in zip(examples, rows):
        prompt = tokenizer(pedro.format_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: row["prompt_length"]] == prompt
        supervised = [t for t in row["labels"] if t != -100]
        assert tokenizer.decode(supervised) == example.response + "<|im_end|>"
    batch = Collator(tokenizer.pad_token_id, "right")(rows)
    with torch.no_grad():
        bare_loss = model(**{k: v for k, v in batch.items() if k != "prompt_lengths"}).loss.item()
    result = train(
        model=model,
        tokenizer=tokenizer,
        examples=examples,
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=4,
        lr=2e-3,
        logging_steps=1,
        progress=False,
    )
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 2
    trained = peft.PeftModel.from_pretrained(pedro.load_backbone("smollm2-135m", quiet=True)[0], str(tmp_path))
    with torch.no_grad():
        trained_loss = trained(**batch).loss.item()
    assert trained_loss < bare_loss  # two steps on these eight rows already fit them better than the backbone
    assert result.summary["trainable_parameters"] == 760_560


def test_a_checkpoint_mark_without_times_leaves_the_run_time_unknown(tmp_path):
    """A run resumed from a checkpoint whose mark holds no times (empty, or not JSON) reports them as unknown
    (None), not as the last piece's time alone; a mark with both adds them to this process's."""
    from types import SimpleNamespace

    from pedro.trainer import MarkCompleteCheckpoints

    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=5)
    (tmp_path / "checkpoint-5").mkdir()
    mark = tmp_path / "checkpoint-5" / COMPLETE
    for text in ("", "not json", '{"train_seconds": 7}'):
        mark.write_text(text)
        marks = MarkCompleteCheckpoints()
        marks.on_train_begin(args, state, None)
        assert marks.cpu_seconds() is None
        assert (marks.seconds() is None) == (text != '{"train_seconds": 7}')
    mark.write_text(json.dumps({"train_seconds": 100.0, "train_cpu_seconds": 200.0}))
    marks = MarkCompleteCheckpoints()
    marks.on_train_begin(args, state, None)
    assert 100 <= marks.seconds() < 160 and 200 <= marks.cpu_seconds() < 260
    marks.on_save(args, state, None)  # the mark now holds the times so far, both
    assert set(json.loads(mark.read_text())) == {"train_seconds", "train_cpu_seconds"}


@pytest.mark.parametrize("method", ["pedro", "lora"])
def test_the_seed_decides_the_run_whatever_the_callers_random_state(tmp_path, method):
    """``seed`` seeds the adapter's initial weights too, not only the data order: the same seed repeats a run
    bit for bit after any use of torch's random generator, another seed gives another run."""

    def run(seed: int, name: str, noise: int) -> dict[str, torch.Tensor]:
        model = tiny_model("llama")
        torch.manual_seed(noise)  # whatever the caller did with the global generator before training
        out = tmp_path / name
        train(model=model, tokenizer=tiny_tokenizer(), examples=EXAMPLES, output_dir=str(out), method=method,
              max_steps=2, batch_size=2, lr=1e-2, seed=seed, progress=False)  # fmt: skip
        return load_file(out / "adapter_model.safetensors")

    first, again, other = run(0, "first", 11), run(0, "again", 12), run(1, "other", 11)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    "field, value",
    [("limit", 0), ("limit", -2), ("batch_size", 0), ("grad_accum", 0), ("lr", -1.0), ("bias_lr", -1.0),
     ("rational_lr", -1e-3), ("max_steps", 0), ("save_total_limit", 0), ("lora_r", 0), ("lora_dropout", 1.0),
     ("match_params", "abc"), ("max_length", 0), ("warmup", -0.1), ("lr", float("nan")), ("scheduler", "cosin")],
)  # fmt: skip
def test_out_of_range_settings_are_refused_naming_them(field, value):
    """Refused when the config is made, before any data or backbone is loaded."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_a_fresh_run_into_a_used_folder_starts_its_own_log(tmp_path):
    kwargs = dict(tokenizer=tiny_tokenizer(), examples=EXAMPLES, output_dir=str(tmp_path), max_steps=2,
                  batch_size=2, logging_steps=1, progress=False)  # fmt: skip
    train(model=tiny_model("llama"), **kwargs)
    first = (tmp_path / "train_log.jsonl").read_text()
    train(model=tiny_model("llama"), **kwargs)
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == first.count("\n")


def test_a_refused_run_leaves_no_output_folder(tmp_path):
    with pytest.raises(ValueError, match="choice data"):
        train(model=tiny_model("llama"), tokenizer=tiny_tokenizer(), examples=EXAMPLES, objective="choice",
              output_dir=str(tmp_path / "out"), progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="eval_steps needs held-out data"):
        train(model=tiny_model("llama"), tokenizer=tiny_tokenizer(), examples=EXAMPLES, eval_steps=2,
              output_dir=str(tmp_path / "out"), progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        train(model=tiny_model("llama"), tokenizer=tiny_tokenizer(), examples=EXAMPLES,
              output_dir=str(tmp_path / "file"), progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "settings, named",
    [(dict(method="lora", pooler="mean"), r"pooler \(pedro\): not read by method lora"),
     (dict(method="ia3", lora_targets="q,k"), r"lora_targets \(lora\): not read by method ia3"),
     (dict(method="pedro", ia3_targets="k"), r"ia3_targets \(ia3\)"),
     (dict(method="lora", match_params="900", lora_r=4), "lora_r is chosen by match_params"),
     (dict(method="pedro", bilevel=True, activation="rational"), "bilevel needs held-out data")],
)  # fmt: skip
def test_settings_the_run_would_not_read_are_refused_before_loading(tmp_path, settings, named):
    """No backbone is passed: the refusal comes before one would be loaded, and leaves no folder."""
    with pytest.raises(ValueError, match=named):
        train(examples=EXAMPLES, output_dir=str(tmp_path / "out"), progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_pedro_settings_define_the_budget_a_matched_method_is_sized_to(tmp_path):
    train(model=tiny_model("llama"), tokenizer=tiny_tokenizer(), examples=EXAMPLES, output_dir=str(tmp_path),
          method="lora", match_params="pedro", r=4, pooler="mean", max_steps=1, batch_size=2, progress=False)  # fmt: skip
    assert (tmp_path / "adapter_config.json").is_file()


def test_resuming_a_finished_run_keeps_the_adapter_it_kept(tmp_path):
    """A run killed after its last checkpoint, before its adapter was written, resumed: no step more (Trainer
    would train one past ``max_steps`` here), and the adapter is the one the run kept (the best evaluation's)."""
    kwargs = dict(
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        eval_examples=EXAMPLES[:4],
        output_dir=str(tmp_path),
        max_steps=7,
        eval_steps=2,
        batch_size=2,
        lr=5e-3,
        seed=3,
        resume=True,
        progress=False,
    )
    first = train(model=tiny_model("llama"), **kwargs)
    kept = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    again = train(model=tiny_model("llama"), **kwargs)
    assert again.summary["resumed_from"].endswith("checkpoint-7") and again.summary["steps"] == 7
    assert again.summary["best"] == first.summary["best"]
    assert again.summary["evaluations"] == first.summary["evaluations"]
    restored = load_file(tmp_path / "adapter_model.safetensors")
    assert kept.keys() == restored.keys() and all(torch.equal(kept[k], restored[k]) for k in kept)
    # checkpoints made with other settings or other data are not continued as if they were this run's
    with pytest.raises(ValueError, match=r"other settings \(lr, max_steps\)"):
        train(model=tiny_model("llama"), **{**kwargs, "lr": 1e-2, "max_steps": 9})
    with pytest.raises(ValueError, match="the training or held-out data"):
        train(model=tiny_model("llama"), **{**kwargs, "examples": EXAMPLES[1:]})
    relogged = train(model=tiny_model("llama"), **{**kwargs, "logging_steps": 3, "threads": 1})  # how it is shown
    assert relogged.summary["steps"] == 7


# bilevel: the rational coefficients' own optimizer (its moments), the order of the dev batches it draws and
# where it is in that order are part of a checkpoint too; 3 dev records in batches of 2 reshuffle it mid-run
@pytest.mark.parametrize(
    "held_out",
    [dict(eval_examples=EXAMPLES[:4]), dict(eval_examples=EXAMPLES[:3], activation="rational", bilevel=True)],
)
def test_save_steps_checkpoint_between_evaluations_and_resume_exactly(tmp_path, held_out):
    """With held-out data evaluated once an epoch, --save-steps still checkpoints every N steps (Trainer alone
    would checkpoint only at the evaluations); a run resumed from such a mid-epoch checkpoint ends with the
    adapter and the best evaluation of the run that was never stopped, which the extra checkpoints do not change."""
    import shutil

    kwargs = dict(
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        **held_out,
        epochs=2,  # 8 records in batches of 2: evaluations (and their checkpoints) at steps 4 and 8
        batch_size=2,
        lr=5e-3,
        seed=3,
        save_total_limit=10,
        progress=False,
    )
    plain = train(model=tiny_model("llama"), output_dir=str(tmp_path / "plain"), **kwargs)
    stepped = train(model=tiny_model("llama"), output_dir=str(tmp_path / "stepped"), save_steps=3, **kwargs)
    checkpoints = tmp_path / "stepped" / "checkpoints"
    assert sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")) == [3, 4, 6, 8]
    assert all((p / COMPLETE).is_file() for p in checkpoints.glob("checkpoint-*"))
    reference = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    if held_out.get("bilevel"):
        assert any(".act.numerator" in k for k in reference)  # the rational coefficients are in the adapter
    weights = load_file(tmp_path / "stepped" / "adapter_model.safetensors")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    assert stepped.summary["best"]["value"] == plain.summary["best"]["value"]
    # a kill after step 3: only the mid-epoch checkpoint is left
    for step in (4, 6, 8):
        shutil.rmtree(checkpoints / f"checkpoint-{step}")
    (tmp_path / "stepped" / "adapter_model.safetensors").unlink()
    resumed = train(
        model=tiny_model("llama"), output_dir=str(tmp_path / "stepped"), save_steps=3, resume=True, **kwargs
    )
    assert resumed.summary["resumed_from"].endswith("checkpoint-3")
    weights = load_file(tmp_path / "stepped" / "adapter_model.safetensors")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    assert resumed.summary["best"]["value"] == plain.summary["best"]["value"]
