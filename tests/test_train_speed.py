"""Training speed features: length-grouped batches, logits only where the loss reads them, bf16 autocast with
fp32 adapter weights, the generator in fp32 under autocast, and the `pedro bench train` script (no timings)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import pedro
import pedro.backbones
from pedro.cli import app
from pedro.data import Collator, Example, LengthGroupedSampler, tokenize_examples
from pedro.generator import VectorGenerator
from pedro.train import TrainConfig, attach_adapter, resolve_precision, supervised_positions, train

ROOT = Path(__file__).resolve().parents[1]
# prompts of 2..12 words (3..9), responses of 1..3 words (43..49): rows of very different lengths
EXAMPLES = [
    Example(
        " ".join(str(3 + (i * 7 + j) % 7) for j in range(2 + i % 11)),
        " ".join(str(43 + (i + j) % 7) for j in range(1 + i % 3)),
    )
    for i in range(24)
]


# ------------------------------------------------------------------------------------------ sampler


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, group_batches=4)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert batches == sampler.batches()
    assert [len(b) for b in batches] == [8] * 25 + [3]  # the one short batch comes last

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    random_batches = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert padded(batches) < 0.75 * padded(random_batches)
    # each batch comes from one sorted group of 4 batches, but the batches are not served by length
    spans = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert spans != sorted(spans) and spans != sorted(spans, reverse=True)


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    lengths = list(range(1, 65))
    first = LengthGroupedSampler(lengths, 4, seed=3)
    again = LengthGroupedSampler(lengths, 4, seed=3)
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(first) != list(again)
    first.set_epoch(1)
    assert list(first) == list(again)
    assert list(LengthGroupedSampler(lengths, 4, seed=4)) != list(LengthGroupedSampler(lengths, 4, seed=3))
    with pytest.raises(ValueError):
        LengthGroupedSampler(lengths, 0)


def test_trainer_groups_batches_and_advances_the_epoch(tmp_path, monkeypatch):
    epochs, widths, seen = [], [], []
    original = LengthGroupedSampler.batches

    def spy(self):
        epochs.append(self.epoch)
        return original(self)

    monkeypatch.setattr(LengthGroupedSampler, "batches", spy)

    class Capture(Collator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            widths.append((batch["input_ids"].shape[1], [len(r["input_ids"]) for r in rows]))
            seen.extend(tuple(r["input_ids"]) for r in rows)
            return batch

    monkeypatch.setattr(sys.modules["pedro.train"], "Collator", Capture)
    train(
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        output_dir=str(tmp_path),
        epochs=2,
        batch_size=4,
        precision="fp32",
        progress=False,
    )
    assert epochs == [0, 1]
    assert len(seen) == 2 * len(EXAMPLES)
    for width, lengths in widths:
        assert width == max(lengths)  # padded to the longest row of the batch, not to max_length
    # 24 rows in one group: sorted by length, so every batch spans a narrow range of lengths
    assert max(max(lengths) - min(lengths) for _, lengths in widths) <= 3


# ------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("method", ["pedro", "lora"])
def test_logits_at_supervised_positions_give_the_full_loss_and_gradients(method):
    tokenizer = tiny_tokenizer()
    rows, _ = tokenize_examples(EXAMPLES[:6], tokenizer, 64)
    batch = Collator(tokenizer.pad_token_id, "right", with_prompt_lengths=method == "pedro")(rows)
    model = attach_adapter(tiny_model("llama"), TrainConfig(method=method, r=4, lora_r=4))
    if method == "pedro":
        randomize(model)
    keep, targets = supervised_positions(batch["labels"])
    assert keep.sum() == (batch["labels"] != -100).sum() == targets.numel()

    def loss_and_grads(**extra):
        model.zero_grad()
        out = model(**batch, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads()
    sparse, sparse_grads = loss_and_grads(logits_to_keep=keep, shift_labels=targets)
    assert sparse.logits.shape == (targets.numel(), full.logits.shape[-1])
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-6, rtol=1e-5)
    # and the selected logits are the full forward's logits at those positions
    torch.testing.assert_close(sparse.logits, full.logits[keep], atol=1e-5, rtol=1e-5)


def test_training_losses_match_with_and_without_the_full_lm_head(tmp_path):
    def losses(**kw):
        log = []
        from transformers import TrainerCallback

        class Log(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    log.append(logs["loss"])

        train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=EXAMPLES,
            output_dir=str(tmp_path / str(kw)),
            max_steps=4,
            batch_size=4,
            lr=5e-3,
            logging_steps=1,
            precision="fp32",
            progress=False,
            callbacks=[Log()],
            **kw,
        )
        return log

    fast, full = losses(response_logits_only=True), losses(response_logits_only=False)
    assert len(fast) == 4
    assert fast == pytest.approx(full, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------------------ precision


def test_auto_precision_follows_native_bf16(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("auto follows the GPU there")
    monkeypatch.setattr(pedro.backbones, "_cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(pedro.backbones, "_cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="flash")


@pytest.mark.parametrize("backbone_dtype", [torch.float32, torch.bfloat16])
def test_bf16_training_keeps_fp32_adapter_weights_and_hands_the_model_back(tmp_path, backbone_dtype):
    model = tiny_model("llama").to(backbone_dtype)
    before = model.config._attn_implementation
    dtypes = {}
    from transformers import TrainerCallback

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            dtypes["adapter"] = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
            dtypes["attention"] = model.get_base_model().config._attn_implementation

    result = train(
        model=model,
        tokenizer=tiny_tokenizer(),
        examples=EXAMPLES,
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=4,
        lr=5e-3,
        precision="bf16",
        progress=False,
        callbacks=[Peek()],
    )
    summary = result.summary
    assert summary["precision"] == "bf16" and summary["attention"] == "eager"
    assert summary["backbone_dtype"] == str(backbone_dtype).removeprefix("torch.")
    assert dtypes == {"adapter": {torch.float32}, "attention": "eager"}
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    assert model.config._attn_implementation == before  # restored after training
    assert all(p.dtype == backbone_dtype for n, p in model.named_parameters() if "pedro_" not in n)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "up.weight" in k)


def test_first_step_loss_in_bf16_is_close_to_fp32(tmp_path):
    def first_loss(precision):
        result = train(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            examples=EXAMPLES,
            output_dir=str(tmp_path / precision),
            max_steps=1,
            batch_size=8,
            precision=precision,
            progress=False,
        )
        return result.summary["train_loss"]

    assert first_loss("bf16") == pytest.approx(first_loss("fp32"), rel=2e-2)


def test_generator_computes_in_fp32_under_autocast():
    torch.manual_seed(0)
    generator = VectorGenerator(16, 4, 24, "last", "gelu", bias=False)
    torch.nn.init.normal_(generator.up.weight, std=0.5)
    # bf16 states with an attention-sink-like row of huge norm
    states = (torch.randn(2, 5, 16) * torch.tensor([1.0, 40.0, 1.0, 1.0, 1.0])[:, None] * 600).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = generator(states.float(), mask)
    for pooler in ("last", "mean"):
        generator.pooler = pooler
        expected = generator(states.float(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = generator(states, mask)
        assert z.dtype == torch.float32
        assert torch.equal(z, expected)


# ------------------------------------------------------------------------------------------ CLI and benchmark


def test_cli_passes_the_speed_options(tmp_path, tiny_llama_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in EXAMPLES))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--backbone",
            str(tiny_llama_dir),
            "--data",
            str(data),
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--precision",
            "bf16",
            "--no-group-by-length",
            "--no-response-logits-only",
            "--attention",
            "sdpa",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training_summary.json").read_text())
    config = summary["config"]
    assert (
        config["precision"],
        config["group_by_length"],
        config["response_logits_only"],
        config["attention"],
        config["threads"],
    ) == ("bf16", False, False, "sdpa", 1)
    assert summary["backbone_dtype"] == "bfloat16" and summary["attention"] == "sdpa" and summary["threads"] == 1


def test_bench_train_quick_writes_results(tmp_path, tiny_llama_dir, monkeypatch):
    """Under results/ of the current directory, named for the quick run: the full run's report on record stays."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in EXAMPLES))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    report = train_speed.main(
        [
            "--quick",
            "--tasks",
            str(data),
            "--backbone",
            str(tiny_llama_dir),
            "--records",
            "24",
            "--batch-size",
            "4",
        ]
    )
    block = report["tasks"][str(data)]
    assert len(block["runs"]) == 2 * len(train_speed.DEFAULT_MODES)
    assert all(run["tokens_per_s"] > 0 for run in block["runs"])
    assert {r["backbone_dtype"] for r in block["runs"] if r["mode"] == "bf16"} == {"bfloat16"}
    assert "pedro bf16 / lora bf16" in block["ratios"] and "pedro bf16 / pedro fp32 before" in block["ratios"]
    out = tmp_path / "results" / "train_speed-quick"
    markdown = out.with_suffix(".md").read_text()
    assert "pedro bench train --quick" in markdown and "| bf16 |" in markdown
    assert json.loads(out.with_suffix(".json").read_text())["auto_precision"] in ("bf16", "fp32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_backward_matches_autograd_addcmul(dtype):
    """pedro.layer.apply_scale's training backward (one addcmul for out's gradient) against autograd's own."""
    from pedro.layer import apply_scale

    torch.manual_seed(0)
    out0, z0, grad = torch.randn(3, 5, 16, dtype=dtype), torch.randn(3, 1, 16) * 0.1, torch.randn(3, 5, 16, dtype=dtype)
    results = []
    for fn in (apply_scale, lambda o, z: torch.addcmul(o, o, z.to(o.dtype))):
        out, z = out0.clone().requires_grad_(), z0.clone().requires_grad_()
        y = fn(out, z)
        y.backward(grad)
        results.append((y.detach(), out.grad, z.grad))
    (y1, go1, gz1), (y2, go2, gz2) = results
    assert torch.equal(y1, y2) and gz1.dtype == torch.float32
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(go1, go2, atol=tol, rtol=tol)
    torch.testing.assert_close(gz1, gz2, atol=tol, rtol=tol)
    with torch.no_grad():  # inference takes the plain kernel
        assert torch.equal(apply_scale(out0, z0), y2)
