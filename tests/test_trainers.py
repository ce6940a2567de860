"""transformers' Trainer and TRL's SFTTrainer accept PEDRO like any PEFT method."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import Trainer, TrainingArguments

import pedro
from pedro import PedroConfig


def _examples(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 97, (int(torch.randint(3, 7, (1,), generator=generator)),), generator=generator)
        answer = (prompt[:1] * 7) % 90 + 3
        rows.append((prompt.tolist(), answer.tolist()))
    return rows


def _collate(features):
    """Right-pads and passes each row's prompt length, so the pooler sees the prompt only."""
    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_lengths": []}
    for f in features:
        pad = width - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [0] * pad)
        out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        out["labels"].append([-100] * f["prompt_length"] + f["input_ids"][f["prompt_length"] :] + [-100] * pad)
        out["prompt_lengths"].append(f["prompt_length"])
    return {k: torch.tensor(v) for k, v in out.items()}


def test_transformers_trainer_trains_only_the_adapter(tmp_path):
    model = pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=4))
    data = [{"input_ids": p + a, "prompt_length": len(p)} for p, a in _examples()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen_lengths = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_lengths.append(kwargs.get("prompt_lengths")), with_kwargs=True
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    result = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert seen_lengths and all(lengths is not None for lengths in seen_lengths)
    for name, param in model.named_parameters():
        if "pedro_" not in name:
            assert torch.equal(param, before[name]), name
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "pedro_" in n)


def test_trl_sft_trainer_accepts_a_pedro_config(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": " ".join(map(str, p)), "completion": " " + " ".join(map(str, a))} for p, a in _examples()]
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        completion_only_loss=True,
    )
    trainer = trl.SFTTrainer(
        model=tiny_model("llama"),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=PedroConfig(r=4),
    )
    assert type(trainer.model.peft_config["default"]) is PedroConfig
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    assert trainable == pedro.count_trainable_parameters(PedroConfig(r=4), tiny_model("llama"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "pedro_" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)
