"""Training works end to end: a PEDRO adapter trained by ``pedro.train`` beats the bare backbone on a task it can
only solve by reading the prompt, scored by that task's own scorer (log-likelihood ranking of its options)."""

from __future__ import annotations

import json

import peft
from conftest import tiny_model, tiny_tokenizer

from pedro.evaluate import evaluate
from pedro.records import Example
from pedro.tasks import get_task
from pedro.train import train

OPTIONS = ["50", "60"]


def _examples(prefixes: list[list[int]]) -> list[Example]:
    """The answer is decided by the prompt's last token alone: 30 -> "50", 31 -> "60" (both options every time)."""
    return [
        Example(" ".join(map(str, [*prefix, cue])), OPTIONS[cue - 30], options=OPTIONS, label=cue - 30)
        for prefix in prefixes
        for cue in (30, 31)
    ]


def test_a_trained_adapter_beats_the_bare_backbone_on_a_learnable_task(tmp_path):
    train_set = _examples([[10 + i, 20 + i] for i in range(8)])
    # prefixes never seen in training: its tokens in pairs it never saw (with tokens it never saw at all, whether a
    # random tiny backbone's states for them let the cue through is luck of the adapter's initial weights: 0.75 to
    # 1.0 over seeds 0-4; these pairs reach 1.0 at every seed 0-7)
    test_set = _examples([[10 + i, 20 + (i + 1) % 8] for i in range(6)])
    data = tmp_path / "toy"
    data.mkdir()
    (data / "test.jsonl").write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "response": e.response, "options": e.options, "label": e.label}) + "\n"
            for e in test_set
        )
    )
    task = get_task(f"jsonl:{data}")
    assert task.kind == "choice" and task.load("test") == test_set
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    before = evaluate(model, tokenizer, task, progress=False)
    assert before["accuracy"] == 0.5  # a backbone that ignores the cue ranks the same option first every time

    result = train(
        model=model,
        tokenizer=tokenizer,
        examples=train_set,
        output_dir=str(tmp_path / "run"),
        r=4,
        lr=2e-2,
        max_steps=80,
        batch_size=8,
        warmup=0,
        logging_steps=80,
        progress=False,
        seed=0,
    )
    trained = peft.PeftModel.from_pretrained(tiny_model("llama"), str(result.output_dir))
    after = evaluate(trained, tokenizer, task, progress=False)
    assert after["n"] == before["n"] == len(test_set)
    assert after["accuracy"] == 1.0 > before["accuracy"]
