"""The choice objective of pedro train: its loss against an independent per-row computation, on both padding
sides and with the LM head run at the last tokens only; that it trains; that it refuses data it cannot train."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer

from pedro.data import Collator, Example, encode_prompt, tokenize_choice_examples
from pedro.evaluate import option_logprobs
from pedro.train import TrainConfig, attach_adapter, train
from pedro.trainer import choice_loss

# the right option follows the prompt's first word: 3 -> "43", 4 -> "44", 5 -> "45"
OPTIONS = ["43", "44", "45"]
EXAMPLES = [
    Example(" ".join([str(3 + i % 3)] + [str(6 + (i * j) % 4) for j in range(i % 4)]), OPTIONS[i % 3], OPTIONS, i % 3)
    for i in range(24)
]


def _adapted(method: str) -> peft.PeftModel:
    model = attach_adapter(tiny_model("llama"), TrainConfig(method=method, r=4, lora_r=4))
    randomize(model)
    if method == "lora":  # randomize() moves PEDRO's weights; LoRA's B starts at zero
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    return model.eval()


def _reference(model: peft.PeftModel, tokenizer, examples: list[Example]) -> torch.Tensor:
    """Each example alone, unpadded: its options' logits at the prompt's last token, cross-entropy."""
    losses = []
    pedro = str(model.peft_config["default"].peft_type) == "PEDRO"
    for example in examples:
        ids = torch.tensor([encode_prompt(tokenizer, example.prompt)])
        kwargs = {"prompt_lengths": torch.tensor([ids.shape[1]])} if pedro else {}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0, -1].double()
        option_ids = [tokenizer.convert_tokens_to_ids(o) for o in example.options]
        losses.append(-logits[option_ids].log_softmax(0)[example.label])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("method", ["pedro", "lora"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_choice_loss_is_each_rows_cross_entropy_over_its_options(method, side):
    tokenizer = tiny_tokenizer()
    model = _adapted(method)
    examples = EXAMPLES[:5]
    rows, report = tokenize_choice_examples(examples, tokenizer, max_length=64)
    assert report.kept == 5 and [r["choice"] for r in rows] == [e.label for e in examples]
    batch = Collator(tokenizer.pad_token_id, side, with_prompt_lengths=method == "pedro")(rows)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # the rows really are padded
    with torch.no_grad():
        reference = _reference(model, tokenizer, examples)
        for logits_mask in (True, False):
            loss, scores = choice_loss(model, batch, logits_mask)
            assert scores.shape == (5, 3)
            torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_options_of_different_counts_are_masked():
    tokenizer = tiny_tokenizer()
    model = _adapted("pedro")
    examples = [Example("3 4", "43", options=["43", "44"], label=0), Example("5 6 7", "45", options=OPTIONS, label=2)]
    rows, _ = tokenize_choice_examples(examples, tokenizer, max_length=64)
    batch = Collator(tokenizer.pad_token_id, "right")(rows)
    assert batch["option_mask"].tolist() == [[True, True, False], [True, True, True]]
    with torch.no_grad():
        loss, scores = choice_loss(model, batch, logits_mask=True)
        assert scores[0, 2] == float("-inf")
        torch.testing.assert_close(loss.double(), _reference(model, tokenizer, examples), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pedro", "lora"])
def test_choice_objective_trains_the_ranking_evaluation_reads(tmp_path, method):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")

    def accuracy(m: torch.nn.Module) -> float:
        scores = option_logprobs(m, tokenizer, EXAMPLES, progress=False)
        return sum(max(range(3), key=s.__getitem__) == e.label for s, e in zip(scores, EXAMPLES)) / len(EXAMPLES)

    result = train(
        model=model,
        tokenizer=tokenizer,
        examples=EXAMPLES,
        eval_examples=EXAMPLES[:6],
        output_dir=str(tmp_path),
        method=method,
        objective="choice",
        max_steps=60,
        batch_size=8,
        lr=3e-2,
        precision="fp32",
        eval_steps=30,
        progress=False,
    )
    evaluations = result.summary["evaluations"]
    assert len(evaluations) == 2 and all("eval_accuracy" in r and "eval_loss" in r for r in evaluations)
    # the objective's loss (ln 3 = 1.10 at chance; the tiny model's logits stay small, so it levels off ~0.7)
    assert evaluations[-1]["eval_loss"] < 0.9 and evaluations[-1]["eval_accuracy"] == 1.0
    trained = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    assert accuracy(tiny_model("llama")) < 0.7
    assert accuracy(trained) == 1.0


def test_choice_objective_refuses_data_it_cannot_train(tmp_path):
    tokenizer = tiny_tokenizer()
    plain = [Example("3 4", "43")] * 4
    with pytest.raises(ValueError, match="choice data"):
        train(
            model=tiny_model("llama"),
            tokenizer=tokenizer,
            examples=plain,
            output_dir=str(tmp_path),
            objective="choice",
            progress=False,
        )
    long_option = [Example("3 4", "43 44", options=["43 44", "45"], label=0)]
    with pytest.raises(ValueError, match="option '43 44' is 2 tokens"):
        tokenize_choice_examples(long_option, tokenizer, max_length=64)
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="rank")
