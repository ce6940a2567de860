"""pedro.evaluate: option log-likelihoods and generations against independent step-by-step references."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer

import pedro
from pedro.data import Example
from pedro.evaluate import evaluate, generate_texts, is_pedro, option_logprobs


def choice_examples(options: list[str], n: int) -> list[Example]:
    """n short number prompts, the right option cycling through ``options``."""
    return [
        Example(f"{3 + i % 5} {4 + i % 3}", options[i % len(options)], options=options, label=i % len(options))
        for i in range(n)
    ]


def _adapted():
    model = pedro.get_pedro_model(tiny_model("llama"), r=4, pooler="mean")
    randomize(model)
    return model.eval()


@torch.no_grad()
def reference_logprob(model, prompt_ids: list[int], option_ids: list[int]) -> float:
    """Prefill the prompt alone (PEDRO's vectors come from it), then feed the option token by token through
    the KV cache: the decoding path, independent of prompt_lengths and padding."""
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    total, past, logits = 0.0, out.past_key_values, out.logits[0, -1]
    for token in option_ids:
        total += logits.log_softmax(-1)[token].item()
        out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return total


@pytest.mark.parametrize("options", [["43", "44", "45"], ["43 44", "45", "46 47 48"]])
def test_option_logprobs_match_step_by_step_decoding(options):
    model, tokenizer = _adapted(), tiny_tokenizer()
    assert is_pedro(model)
    examples = [Example(p, options[0], options=options, label=0) for p in ("5 6 7", "8", "9 9 5 6 7 8")]
    scores = option_logprobs(model, tokenizer, examples, batch_size=2, progress=False)
    for example, row in zip(examples, scores):
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        expected = [
            reference_logprob(model, prompt, tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options
        ]
        assert row == pytest.approx(expected, abs=1e-4)


def test_generate_texts_equal_one_prompt_at_a_time():
    model, tokenizer = _adapted(), tiny_tokenizer()
    prompts = ["5 6 7", "8", "9 9 5 6 7 8"]
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    for prompt, text in zip(prompts, batched):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0
            )
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_evaluate_choice_task_accuracy_and_predictions(tmp_path):
    model, tokenizer = _adapted(), tiny_tokenizer()
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    rows = [
        {"prompt": f"{5 + i % 4} 6", "response": "43" if i % 2 else "44", "options": ["43", "44"]} for i in range(6)
    ]
    (task_dir / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = evaluate(model, tokenizer, f"jsonl:{task_dir}", predictions_path=tmp_path / "p.jsonl", progress=False)
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    # independent recount from the written scores
    expected = sum(
        max(range(2), key=lambda k: p["scores"][k]) == ["43", "44"].index(p["expected"]) for p in predictions
    )
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(expected / 6)
    assert [p["correct"] for p in predictions] == [p["prediction"] == p["expected"] for p in predictions]
    assert model.training is False


def test_evaluate_generation_task_scores_exact_match(tmp_path):
    model, tokenizer = _adapted(), tiny_tokenizer()
    texts = generate_texts(model, tokenizer, ["5 6", "7 8"], max_new_tokens=3, progress=False)
    task_dir = tmp_path / "gen"
    task_dir.mkdir()
    # the first reference is what the model generates, the second is not
    rows = [{"prompt": "5 6", "response": texts[0]}, {"prompt": "7 8", "response": "99 98"}]
    (task_dir / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from pedro.tasks import get_task

    task = get_task(f"jsonl:{task_dir}")
    task.max_new_tokens = 3
    result = evaluate(model, tokenizer, task, progress=False)
    assert texts[1] != "99 98"
    assert result["exact_match"] == 0.5


def test_choice_evaluation_reports_macro_f1_for_a_fixed_label_set(tmp_path):
    model, tokenizer = _adapted(), tiny_tokenizer()
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    rows = [
        {"prompt": f"{5 + i % 4} {6 + i % 3}", "response": ["43", "44", "45"][i % 3], "options": ["43", "44", "45"]}
        for i in range(9)
    ]
    (task_dir / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = evaluate(model, tokenizer, f"jsonl:{task_dir}", predictions_path=tmp_path / "p.jsonl", progress=False)
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    pairs = [(p["expected"], p["prediction"]) for p in predictions]
    f1 = []
    for cls in {c for pair in pairs for c in pair}:
        tp = sum(e == p == cls for e, p in pairs)
        precision = tp / sum(p == cls for _, p in pairs) if any(p == cls for _, p in pairs) else 0.0
        recall = tp / sum(e == cls for e, _ in pairs) if any(e == cls for e, _ in pairs) else 0.0
        f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert result["macro_f1"] == pytest.approx(sum(f1) / len(f1))
    # options that differ per example: accuracy only
    (task_dir / "test.jsonl").write_text("\n".join(json.dumps({**r, "options": [r["response"], "46"]}) for r in rows))
    assert "macro_f1" not in evaluate(model, tokenizer, f"jsonl:{task_dir}", progress=False)


@pytest.mark.parametrize("options", [["43", "44", "45"], ["43 44", "45", "46 47 48"]])
def test_scoring_progress_counts_examples_not_options(monkeypatch, options):
    import importlib

    ev = importlib.import_module("pedro.evaluate")  # the module (pedro.evaluate the attribute is the function)
    bars = []

    class Bar:
        def __init__(self, total, desc, show):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(ev, "_bar", Bar)
    model, tokenizer = _adapted(), tiny_tokenizer()
    examples = [Example(p, options[0], options=options, label=0) for p in ("5 6 7", "8", "9 9 5 6 7 8", "4 4")]
    option_logprobs(model, tokenizer, examples, batch_size=2, progress=True)
    assert [(b.total, b.n) for b in bars] == [(4, 4)]


def test_training_reports_accuracy_on_held_out_choice_examples(tmp_path):
    """--eval-data with choice examples: eval_accuracy (and macro-F1) next to eval_loss in the log and the
    summary, equal to what evaluate() gives the trained adapter."""
    from conftest import tiny_model

    from pedro.train import train

    options = ["43", "44"]
    examples = choice_examples(options, 8)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = train(
        model=model,
        tokenizer=tokenizer,
        examples=examples,
        eval_examples=examples[:6],
        output_dir=str(tmp_path),
        max_steps=4,
        eval_steps=2,
        batch_size=4,
        lr=1e-2,
        logging_steps=1,
        precision="fp32",
        progress=False,
    )
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == 2 and all(0.0 <= r["eval_accuracy"] <= 1.0 and "eval_macro_f1" in r for r in evals)
    final = result.summary["final_metrics"]
    from pedro.tasks import JsonlTask

    task_dir = tmp_path / "held_out"
    task_dir.mkdir()
    (task_dir / "test.jsonl").write_text(
        "\n".join(json.dumps({"prompt": e.prompt, "response": e.response, "options": options}) for e in examples[:6])
    )
    direct = evaluate(result.model, tokenizer, JsonlTask(task_dir), progress=False)
    assert final["eval_accuracy"] == pytest.approx(direct["accuracy"])
    assert final["eval_macro_f1"] == pytest.approx(direct["macro_f1"])
    [kept] = [r for r in evals if r["step"] == result.summary["best"]["step"]]  # not evaluated a second time
    assert kept["eval_accuracy"] == pytest.approx(direct["accuracy"])


def test_the_trained_model_scores_as_its_saved_adapter_and_the_bare_injected_one_is_refused(tmp_path):
    """Options of several tokens: TrainResult.model gives what the saved adapter gives when loaded; the backbone
    PEFT injected into (not a PeftModel: it cannot take prompt_lengths) is refused instead of scored wrongly."""
    from peft import PeftModel

    from pedro.train import train

    options = ["43 44", "45", "46 47 48"]
    examples = choice_examples(options, 9)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = train(model=model, tokenizer=tokenizer, examples=examples, output_dir=str(tmp_path / "run"),
                   max_steps=3, batch_size=3, lr=3e-2, precision="fp32", progress=False)  # fmt: skip
    assert not result.model.training
    trained = option_logprobs(result.model, tokenizer, examples, batch_size=4, progress=False)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "run")).eval()
    again = option_logprobs(reloaded, tokenizer, examples, batch_size=4, progress=False)
    assert torch.allclose(torch.tensor(trained), torch.tensor(again), atol=1e-5)
    with pytest.raises(ValueError, match="not a PeftModel"):
        option_logprobs(model, tokenizer, examples, batch_size=4, progress=False)
