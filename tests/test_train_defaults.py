"""pedro.train's defaults: epochs sized to the data, a seeded dev split that keeps the best epoch, a learning rate
per method; PEDRO's Up bias in an optimizer group of its own, and the bi-level update of rational activations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from transformers import TrainerCallback

from pedro.data import Example
from pedro.train import DEFAULT_LR, MAX_AUTO_EPOCHS, auto_epochs, carve_dev, train

# a learnable choice task for the tiny tokenizer, 40 distinct prompts (i's base-7 digits as words 3..9): the
# answer is 43 when the first word is odd, else 44
_DIGITS = [[3 + i // 49 % 7, 3 + i // 7 % 7, 3 + i % 7] for i in range(7, 47)]
CHOICES = [
    Example(" ".join(map(str, d)), "43" if d[0] % 2 else "44", options=["43", "44"], label=0 if d[0] % 2 else 1)
    for d in _DIGITS
]


def test_auto_epochs_aims_at_a_step_budget_within_bounds():
    assert auto_epochs(400, 8) == 6  # 50 steps per epoch -> 6 epochs for 300 steps
    assert auto_epochs(1000, 8) == 3
    assert auto_epochs(67_000, 8) == 1
    assert auto_epochs(10, 8) == MAX_AUTO_EPOCHS


def test_carve_dev_sizes_and_keeps_prompts_together():
    records = [Example(f"p{i // 3}", f"r{i}") for i in range(600)]  # 200 prompts, 3 references each
    dev, rest = carve_dev(records, None)
    assert len(dev) == 60 and len(rest) == 540  # 10 % of 600
    assert not {e.prompt for e in dev} & {e.prompt for e in rest}
    assert carve_dev(records[:150], None) == ([], records[:150])  # too few records: no dev split
    assert len(carve_dev(records, 0.25)[0]) == 150 and len(carve_dev(records, 30)[0]) == 30
    assert carve_dev(records, 0) == ([], records)
    # sized from what is trained on (10 % of 300, at least 32), rounded up to whole prompts (of 3 records)
    assert len(carve_dev(records, None, limit=300)[0]) == 33
    with pytest.raises(ValueError, match="leaving none"):
        carve_dev(records, 600)


def test_dev_split_evaluates_every_epoch_and_keeps_the_best(tmp_path):
    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=CHOICES,
        output_dir=str(tmp_path),
        dev_split=10,
        epochs=3,
        batch_size=6,
        lr=5e-2,
        progress=False,
    )
    summary = result.summary
    assert summary["dev_records"] == 10 and summary["data"]["kept"] == 30
    assert [round(e["epoch"]) for e in summary["evaluations"]] == [1, 2, 3]
    assert all("eval_accuracy" in e for e in summary["evaluations"])
    best = summary["best"]
    assert best["metric"] == "eval_accuracy"
    assert best["value"] == max(e["eval_accuracy"] for e in summary["evaluations"])
    # the adapter written is the best epoch's checkpoint, not the last step's weights
    kept = load_file(tmp_path / "checkpoints" / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    final = load_file(tmp_path / "adapter_model.safetensors")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    assert json.loads((tmp_path / "training_summary.json").read_text())["best"]["step"] == best["step"]


def test_explicit_held_out_data_replaces_the_dev_split(tmp_path):
    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=CHOICES,
        eval_examples=CHOICES[:4],
        output_dir=str(tmp_path),
        dev_split=10,
        epochs=1,
        batch_size=8,
        progress=False,
    )
    assert result.summary["dev_records"] == 0 and result.summary["data"]["kept"] == 40
    assert len(result.summary["evaluations"]) == 1


@pytest.mark.parametrize("method", ["pedro", "lora", "ia3"])
def test_learning_rate_and_epochs_default_per_method(tmp_path, method):
    result = train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=CHOICES[:8],
        output_dir=str(tmp_path),
        method=method,
        batch_size=8,
        progress=False,
    )
    assert result.summary["lr"] == DEFAULT_LR[method]
    assert result.summary["epochs"] == MAX_AUTO_EPOCHS and result.summary["steps"] == MAX_AUTO_EPOCHS
    assert result.summary["dev_records"] == 0  # 8 records: too few to hold any out


class Groups(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [
            (g["lr"], sorted(names[id(p)] for p in g["params"]), bool(g.get("pedro_bias")))
            for g in optimizer.param_groups
            if g["params"]
        ]


def test_bias_lr_puts_the_up_biases_in_their_own_group(tmp_path):
    groups = Groups()
    train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=CHOICES[:8],
        output_dir=str(tmp_path),
        max_steps=1,
        batch_size=8,
        lr=1e-3,
        bias_lr=3e-2,
        scheduler="constant",
        progress=False,
        callbacks=[groups],
    )
    own = [g for g in groups.groups if g[2]]
    assert len(own) == 1 and own[0][0] == 3e-2
    assert len(own[0][1]) == 3 and all(n.endswith("pedro_generator.default.up.bias") for n in own[0][1])
    rest = [n for lr, names, is_bias in groups.groups if not is_bias for n in names]
    assert rest and not any(n.endswith("up.bias") for n in rest)
    assert all(lr == 1e-3 for lr, _, is_bias in groups.groups if not is_bias)


def test_bilevel_steps_rational_coefficients_on_dev_batches_only(tmp_path):
    groups = Groups()
    model = tiny_model("llama")
    result = train(
        model=model,
        tokenizer=tiny_tokenizer(),
        examples=CHOICES,
        output_dir=str(tmp_path),
        dev_split=10,
        max_steps=4,
        batch_size=6,
        lr=0.0,
        activation="rational",
        bilevel=True,
        rational_lr=1e-2,
        scheduler="constant",
        progress=False,
        callbacks=[groups],
    )
    main = [n for _, names, _ in groups.groups for n in names]
    assert main and not any(".act." in n for n in main)  # the main optimizer never sees the coefficients
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    rational = {k: v for k, v in weights.items() if ".act." in k}
    assert rational
    from pedro.generator import GELU_DENOMINATOR, GELU_NUMERATOR

    init = {"numerator": torch.tensor(GELU_NUMERATOR), "denominator": torch.tensor(GELU_DENOMINATOR)}
    # lr 0 for everything else: the coefficients moved, so their own optimizer stepped them (on dev batches)
    assert all(not torch.allclose(v, init[k.rsplit(".", 1)[-1]]) for k, v in rational.items())
    assert result.summary["dev_records"] == 10
    with pytest.raises(ValueError, match="activation rational"):
        train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=CHOICES,
            output_dir=str(tmp_path / "x"),
            bilevel=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="bilevel needs held-out data"):
        train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=CHOICES,
            output_dir=str(tmp_path / "y"),
            dev_split=0,
            activation="rational",
            bilevel=True,
            max_steps=1,
            progress=False,
        )
    # too few records for the automatic dev split: the error says so and names the flags that give one
    with pytest.raises(ValueError, match=r"fewer than 200 training records\) or held-out data \(--eval-data"):
        train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=CHOICES,
            output_dir=str(tmp_path / "z"),
            activation="rational",
            bilevel=True,
            max_steps=1,
            progress=False,
        )
