"""``train()``: fine-tune a PEDRO adapter (or a LoRA / (IA)3 baseline through peft) with transformers' Trainer.

One run: records (``pedro.data``) -> a seeded dev split and the defaults (``pedro.train_config``) -> tokenised rows
whose prompt part is exactly what inference encodes -> the adapter attached to the backbone (baselines sized by
``pedro.sizing``) -> ``pedro.trainer.PedroTrainer`` -> the best epoch's adapter written as a PEFT folder (replaced
as a whole), with ``training_summary.json`` and a JSONL log. Speed choices (bf16 autocast with fp32 adapter weights
where the CPU has native bf16, eager attention under bf16, length-grouped batches, logits only where the loss
reads them) are in docs/training.md, "Speed".
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import peft
import torch
from torch import nn
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from pedro.backbones import DEFAULT_BACKBONE, layer_map, load_backbone, resolve_dtype
from pedro.compat import forget_gguf_quantization
from pedro.data import (
    Collator,
    Example,
    load_records,
    prompt_format,
    tokenize_choice_examples,
    tokenize_examples,
    write_json_atomic,
)
from pedro.io import evaluations_in, save_adapter_atomic
from pedro.sizing import (
    expected_parameter_count,
    ia3_parameter_count,
    lora_parameter_count,
    match_sizes,
    print_sizes,
    size_report,
)
from pedro.train_config import (
    CHECKPOINTS,
    DEFAULT_LR,
    DEV_FRACTION,
    DEV_FROM,
    DEV_MAX,
    DEV_MIN,
    EAGER_ATTENTION_BYTES,
    IA3_FEEDFORWARD,
    LOG_NAME,
    MAX_AUTO_EPOCHS,
    METHODS,
    SUMMARY_NAME,
    TARGET_STEPS,
    TrainConfig,
    TrainResult,
    _pedro_config,
    check_options_read,
)
from pedro.trainer import (
    CheckpointEvery,
    MarkCompleteCheckpoints,
    PedroTrainer,
    ProgressAndLog,
    last_complete_checkpoint,
    logged_train_loss,
    restore_finished_run,
    supervised_positions,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def attach_adapter(model: nn.Module, cfg: TrainConfig) -> peft.PeftModel:
    """Wrap the backbone in the chosen PEFT method (the backbone is frozen by peft)."""
    if cfg.method == "pedro":
        config: peft.PeftConfig = _pedro_config(cfg)
    elif cfg.method == "lora":
        config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
            lora_dropout=cfg.lora_dropout,
            target_modules=layer_map(model).module_names(cfg.lora_targets),
        )
    else:
        config = peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=layer_map(model).module_names(cfg.ia3_targets),
            feedforward_modules=layer_map(model).module_names([t for t in cfg.ia3_targets if t in IA3_FEEDFORWARD]),
        )
    forget_gguf_quantization(model)
    return peft.get_peft_model(model, config)


def _fp32_trainable(model: nn.Module) -> None:
    """Adapter weights are trained in fp32 whatever the backbone's dtype (they are the optimizer's master
    weights; autocast computes with bf16 copies). PEDRO builds its generators in fp32 and peft upcasts LoRA
    and (IA)3 weights itself; this catches anything that came out in half precision anyway."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU with bf16, or on a CPU with native bf16 matmuls (AVX512-BF16 / AMX, the
    test ``pedro.backbones.resolve_dtype("auto")`` uses; there bf16 GEMMs take about a third of their fp32
    time), else ``fp32``. Other values are returned as they are."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


def _attention(cfg: TrainConfig, precision: str, model: nn.Module, longest: int) -> str | None:
    """The attention implementation to train with, or None to keep the backbone's.

    Under bf16 on CPU, PyTorch's fused attention (sdpa) is slow in its backward pass (about 4x its fp32 time
    on SmolLM2 at 54 tokens); the eager matmul + softmax (softmax in fp32) takes a fraction of it, at the cost
    of keeping each layer's (batch, heads, T, T) attention matrix for the backward pass."""
    if cfg.attention != "auto":
        return cfg.attention
    if precision != "bf16" or torch.cuda.is_available():
        return None
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    # per layer: scores (bf16), softmax output (fp32) and its bf16 copy are kept for the backward pass
    held = layers * cfg.batch_size * heads * longest * longest * 8
    return "eager" if held <= EAGER_ATTENTION_BYTES else None


def auto_epochs(records: int, batch: int) -> int:
    """Epochs for about TARGET_STEPS optimizer steps: one pass over a few hundred records trains nothing useful,
    while a large data set needs only one (capped at MAX_AUTO_EPOCHS)."""
    per_epoch = max(1, math.ceil(records / batch))
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(TARGET_STEPS / per_epoch)))


def _kept_evaluation(trainer: Any, evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out metrics of the adapter kept: the best checkpoint's, as logged when it was evaluated (the
    same weights, so scoring them again would only repeat that pass), else a fresh evaluation."""
    best = trainer.state.best_global_step
    logged = [r for r in evaluations if best is not None and r.get("step") == best]
    if logged:
        return {k: v for k, v in logged[-1].items() if k.startswith("eval_") or k == "epoch"}
    return dict(trainer.evaluate())


def carve_dev(
    records: list[Example], dev_split: float | None, limit: int | None = None
) -> tuple[list[Example], list[Example]]:
    """(dev, train): the first records of the (already shuffled) list held out for choosing the best epoch.

    ``dev_split`` None sizes it automatically from the records that will be trained on (``limit`` or all),
    0 turns it off, a fraction or a count sets it."""
    base = min(limit, len(records)) if limit else len(records)
    if dev_split is None:
        n = min(DEV_MAX, max(DEV_MIN, round(DEV_FRACTION * base))) if base >= DEV_FROM else 0
    else:
        n = round(dev_split * base) if dev_split < 1 else int(dev_split)
    if n >= len(records):
        raise ValueError(
            f"dev_split {dev_split} would hold out {n} of {len(records)} records, leaving none to train on"
        )
    if n == 0:
        return [], records
    # records sharing a prompt (several references of one input) stay on one side, so dev scores are not
    # inflated by training on the same inputs
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(json.dumps(record.prompt, sort_keys=True, default=str), []).append(i)
    held: set[int] = set()
    for members in groups.values():
        if len(held) >= n:
            break
        held.update(members)
    if len(held) == len(records):
        raise ValueError(
            f"the records have too few distinct prompts to hold out a dev split of {n}: pass --dev-split 0"
        )
    return [r for i, r in enumerate(records) if i in held], [r for i, r in enumerate(records) if i not in held]


# settings a resumed run may change: how it is shown, logged and kept, not what it learns
RESUMABLE_CHANGES = frozenset({"resume", "progress", "threads", "report_to", "logging_steps", "save_total_limit"})
RUN_NAME = "run.json"  # in the checkpoints folder: the settings and the data its checkpoints were made with


def _same_run(
    checkpoint_dir: Path, cfg: TrainConfig, rows: list[dict[str, Any]], eval_rows: Any, resuming: bool
) -> None:
    """Record what this run's checkpoints come from, or, resuming, refuse checkpoints made with other settings
    or other data: the run would continue someone else's optimisation and report it as this one."""
    data = hashlib.sha256(json.dumps([rows, eval_rows], sort_keys=True, default=str).encode()).hexdigest()
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and k != "output_dir"}
    identity = json.loads(json.dumps({"settings": settings, "data": data}))
    recorded = checkpoint_dir / RUN_NAME
    if resuming and recorded.is_file():
        before = json.loads(recorded.read_text())
        old, new = before.get("settings", {}), identity["settings"]
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        changed += ["the training or held-out data"] if before.get("data") != data else []
        if changed:
            raise ValueError(
                f"resume: the checkpoints in {checkpoint_dir} were made with other settings ({', '.join(changed)}); "
                "train into another output folder, or without resume to start over"
            )
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recorded, identity)


def train(
    config: TrainConfig | None = None,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: Any = None,
    examples: Sequence[Example] | None = None,
    eval_examples: Sequence[Example] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    **overrides: Any,
) -> TrainResult:
    """Train an adapter and write it (PEFT format) with ``training_summary.json`` to ``output_dir``.

    ``config`` or keyword overrides give the :class:`TrainConfig`; ``model``/``tokenizer`` (a bare backbone,
    e.g. already loaded) and ``examples`` skip loading. The backbone passed in is wrapped in place.
    """
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    check_options_read(cfg)  # before any data or backbone is loaded
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if examples is None and not cfg.data:
        raise ValueError("give training data: a JSONL file, a datasets folder, or a task name")
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file, not a folder")
    wall0 = time.perf_counter()
    # data problems are reported before minutes go into loading a backbone
    records = list(examples) if examples is not None else load_records(cfg.data, "train", cfg.data_dir)
    held_out = list(eval_examples) if eval_examples is not None else None
    if held_out is None and cfg.eval_data:
        held_out = load_records(cfg.eval_data, "test", cfg.data_dir)
    if cfg.objective == "choice":
        from pedro.evaluate import is_choice_data

        for name, data in (("training", records), ("held-out", held_out)):
            if data is not None and not is_choice_data(data):
                raise ValueError(
                    "objective choice needs choice data (every record with options and the right one's label); "
                    f"the {name} records are not"
                )
    random.Random(cfg.seed).shuffle(records)
    dev: list[Example] = []
    if held_out is None:
        dev, records = carve_dev(records, cfg.dev_split, cfg.limit)
        held_out = dev or None
    records = records[: cfg.limit] if cfg.limit else records
    # these read held-out data; say how to give it, and why none was carved automatically
    hold_out = (
        "give a dev split (--dev-split N / dev_split=N records or a fraction"
        + (
            f"; none is carved automatically from fewer than {DEV_FROM} training records"
            if cfg.dev_split is None
            else ""
        )
        + ") or held-out data (--eval-data / eval_data, eval_examples)"
    )
    if cfg.eval_steps and held_out is None:
        raise ValueError(f"eval_steps needs held-out data to evaluate: {hold_out}")
    if cfg.early_stopping and held_out is None:
        raise ValueError(f"early_stopping needs held-out data: {hold_out}")
    if cfg.bilevel and held_out is None:
        raise ValueError(f"bilevel needs held-out data for the rational coefficients' steps: {hold_out}")
    loaded_here = model is None
    precision = resolve_precision(cfg.precision)
    if model is None:
        # the frozen backbone is held in bf16 under bf16 autocast: autocast would otherwise cast every frozen
        # weight again at every step (the adapter's weights stay fp32 either way)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, tokenizer = load_backbone(cfg.backbone or DEFAULT_BACKBONE, dtype=dtype, quiet=not cfg.progress)
    if tokenizer is None:
        raise ValueError("pass the backbone's tokenizer with the model")

    requested, budget = cfg, None
    if cfg.match_params is not None:
        cfg, budget = match_sizes(cfg, model)
    sizes = size_report(model, cfg, budget)
    if cfg.progress:
        print_sizes(sizes, cfg.method, budget)

    epochs = cfg.epochs if cfg.epochs is not None else auto_epochs(len(records), cfg.batch_size * cfg.grad_accum)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    if cfg.progress and ((cfg.epochs is None and cfg.max_steps < 0) or cfg.lr is None or dev):
        print(
            "defaults: "
            + ", ".join(
                (
                    [f"{epochs:g} epochs for {len(records)} records (--epochs)"]
                    if cfg.epochs is None and cfg.max_steps < 0
                    else []
                )
                + ([f"lr {lr:g} for {cfg.method} (--lr)"] if cfg.lr is None else [])
                + (
                    [
                        f"{len(dev)} records held out as a dev split, evaluated every epoch, best epoch kept (--dev-split)"
                    ]
                    if dev
                    else []
                )
            )
        )
    tokenize = tokenize_choice_examples if cfg.objective == "choice" else tokenize_examples
    rows, report = tokenize(records, tokenizer, cfg.max_length, cfg.overflow)
    eval_rows, eval_report = None, None
    if held_out is not None:
        eval_rows, eval_report = tokenize(held_out, tokenizer, cfg.max_length, cfg.overflow)
    if cfg.progress:
        print(f"train data: {report}" + (f"\neval data: {eval_report}" if eval_report else ""))

    attention = _attention(cfg, precision, model, max(len(row["input_ids"]) for row in rows))
    previous_attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention is not None and attention != previous_attention:
        model.set_attn_implementation(attention)
    set_seed(cfg.seed)  # the adapter's initial weights too, not only the data order: a seed repeats a run
    peft_model = attach_adapter(model, cfg)
    _fp32_trainable(peft_model)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    peft_model.train()
    checkpoint_dir = output_dir / CHECKPOINTS
    evaluating = eval_rows is not None
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no empty folder behind
    accuracy = None  # for choice data: accuracy next to the loss, which also picks the best checkpoint
    if held_out is not None:
        from pedro.evaluate import ChoiceAccuracy, is_choice_data

        if is_choice_data(held_out):
            accuracy = ChoiceAccuracy(held_out, tokenizer, cfg.batch_size)
    choices = accuracy is not None
    # with held-out data: evaluate every eval_steps steps (or every epoch), checkpoint at each evaluation and
    # end with the best one (accuracy for choice data, else loss)
    strategy = ("steps" if cfg.eval_steps else "epoch") if evaluating else "no"
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,
        num_train_epochs=epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy=strategy if evaluating else ("steps" if cfg.save_steps else "no"),
        save_steps=(cfg.eval_steps if evaluating else cfg.save_steps) or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy=strategy,
        eval_steps=cfg.eval_steps or None,
        load_best_model_at_end=evaluating,
        metric_for_best_model=("eval_accuracy" if choices else "eval_loss") if evaluating else None,
        greater_is_better=choices if evaluating else None,
        seed=cfg.seed,
        remove_unused_columns=False,  # Trainer would drop prompt_lengths, which PEDRO's forward needs
        label_names=["choice"] if cfg.objective == "choice" else None,  # evaluation's loss is the objective's
        include_num_input_tokens_seen="non_padding",
        report_to=list(cfg.report_to) or "none",
        disable_tqdm=True,  # our own bar (ProgressAndLog) shows loss and tokens/s
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        prediction_loss_only=True,  # evaluation reports the loss; keeping every batch's logits is wasted memory
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    collator = Collator(tokenizer.pad_token_id, cfg.padding_side, with_prompt_lengths=cfg.method == "pedro")
    progress = ProgressAndLog(output_dir / LOG_NAME, cfg.progress)
    marks = MarkCompleteCheckpoints()
    extra: list[TrainerCallback] = [progress, *callbacks]
    if accuracy is not None:  # first: it fills the log record before it is written
        extra.insert(0, accuracy)
    if evaluating and cfg.save_steps:  # evaluations checkpoint on their own; these come between them
        extra.append(CheckpointEvery(cfg.save_steps))
    if cfg.early_stopping:
        from transformers import EarlyStoppingCallback

        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping))
    trainer = PedroTrainer(
        model=peft_model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        callbacks=extra,
        rational_lr=cfg.rational_lr,
        bias_lr=cfg.bias_lr,
        bilevel_rows=eval_rows if cfg.bilevel else None,
        group_by_length=cfg.group_by_length,
        response_logits_only=cfg.response_logits_only,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressAndLog shows and records them
    if trainer.bilevel is not None:  # its state is part of a checkpoint
        trainer.add_callback(trainer.bilevel)
    trainer.add_callback(marks)  # last: its mark completes a checkpoint once everything else is saved
    resume_from = None
    if cfg.resume:
        resume_from = last_complete_checkpoint(checkpoint_dir)
        if cfg.progress:
            print(f"resuming from {resume_from}" if resume_from else "no checkpoint to resume from: starting fresh")
    _same_run(checkpoint_dir, cfg, rows, eval_rows, resuming=resume_from is not None)
    if resume_from is None:  # a fresh run's log is its own, not appended to an earlier run's in this folder
        (output_dir / LOG_NAME).unlink(missing_ok=True)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if resume_from and restore_finished_run(trainer, resume_from):
            marks.on_train_begin(trainer.args, trainer.state, trainer.control)  # the run's times, from its mark
            train_metrics: dict[str, Any] = {}
        else:
            train_metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
        # a resumed run's include the time up to its checkpoint (None: that checkpoint did not record it)
        train_seconds, train_cpu_seconds = marks.seconds(), marks.cpu_seconds()
        evaluations = [r for r in trainer.state.log_history if "eval_loss" in r]
        final_eval = _kept_evaluation(trainer, evaluations) if eval_rows is not None else {}
    finally:
        torch.set_num_threads(threads)
        if attention is not None and previous_attention is not None and attention != previous_attention:
            model.set_attn_implementation(previous_attention)  # the model passed in is handed back as it was

    stale = evaluations_in(output_dir)
    save_adapter_atomic(
        peft_model,
        output_dir,
        cfg.backbone or (DEFAULT_BACKBONE if loaded_here else None),
        prompt_format(tokenizer),
        drop=stale,
    )
    if stale and cfg.progress:
        print(f"removed {', '.join(stale)} from {output_dir}: they scored the adapter this run replaced")
    summary = {
        "config": asdict(cfg),
        "requested": asdict(requested) if requested is not cfg else None,
        "backbone": cfg.backbone or (DEFAULT_BACKBONE if loaded_here else getattr(model.config, "name_or_path", None)),
        "method": cfg.method,
        "precision": precision,
        "backbone_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention": attention or previous_attention,
        "threads": cfg.threads or threads,
        "trainable_parameters": trainable,
        "parameter_sizes": sizes,
        "data": report.as_dict(),
        "eval_data": eval_report.as_dict() if eval_report else None,
        "steps": trainer.state.global_step,
        "epochs": epochs if cfg.max_steps < 0 else trainer.state.epoch,  # with max_steps: the epochs it ran
        "lr": lr,
        "dev_records": len(dev),
        "best": {
            "metric": args.metric_for_best_model,
            "value": trainer.state.best_metric,
            "step": trainer.state.best_global_step,
        }
        if evaluating
        else None,
        "evaluations": evaluations,
        "resumed_from": resume_from,
        "train_loss": train_metrics["train_loss"]
        if resume_from is None
        else logged_train_loss(trainer.state.log_history),
        "final_metrics": {**train_metrics, **final_eval},
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        # of the steps this process ran (None: it resumed from the last step and ran none)
        "tokens_per_second": progress.tokens_per_second(trainer.state)
        if trainer.state.global_step > marks.resumed_at
        else None,
    }
    write_json_atomic(output_dir / SUMMARY_NAME, summary)
    if cfg.progress:
        rate = summary["tokens_per_second"]
        spent = [f"{train_seconds:.0f}s"] if train_seconds is not None else []
        spent += [f"{rate:.0f} tokens/s"] if rate is not None else []
        print(f"adapter written to {output_dir} ({', '.join([f'{trainer.state.global_step} steps', *spent])})")
    peft_model.eval()
    return TrainResult(output_dir=output_dir, summary=summary, model=peft_model)


__all__ = [
    "DEFAULT_LR",
    "MAX_AUTO_EPOCHS",
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "attach_adapter",
    "auto_epochs",
    "carve_dev",
    "expected_parameter_count",
    "ia3_parameter_count",
    "lora_parameter_count",
    "match_sizes",
    "resolve_precision",
    "size_report",
    "supervised_positions",
    "train",
]
