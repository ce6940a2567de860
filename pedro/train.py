"""Fine-tune a PEDRO adapter (or a LoRA / (IA)3 baseline through peft) with transformers' Trainer.

What this module adds to Trainer, and why:

- the data path of ``pedro.data``: loss on response tokens only, ``prompt_lengths`` in every batch so PEDRO's
  pooler sees exactly the prompt (Trainer's column pruning is off, the collator decides what goes in);
- ``match_params``: baselines sized to the same trainable-parameter budget, the only fair comparison;
- a separate learning rate for the rational activation's coefficients (the paper optimises them apart);
- checkpoints written atomically (a temp folder renamed into place), so ``resume`` after a crash or a
  SIGKILL never picks up a half-written checkpoint, and continues exactly;
- a PEFT adapter folder plus ``training_summary.json`` and a JSONL log as the output, also written atomically;
- speed (docs/training.md, "Speed"): bf16 autocast with fp32 adapter weights on CPUs with native bf16 (and a
  bf16 backbone when this module loads it), eager attention under bf16, length-grouped batches, and logits
  only at the positions the loss reads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import peft
import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from pedro.backbones import DEFAULT_BACKBONE, layer_map, load_backbone, resolve_dtype
from pedro.config import PedroConfig
from pedro.data import (
    OVERFLOW,
    Collator,
    Example,
    LengthGroupedSampler,
    load_records,
    prompt_format,
    tokenize_examples,
    write_json_atomic,
)
from pedro.io import record_prompt_format
from pedro.model import IGNORE_INDEX, count_trainable_parameters

METHODS = ("pedro", "lora", "ia3")
# peft's own (IA)3 placement for LLaMA-like models (the original paper's): keys, values, and the input of
# the FFN down-projection
IA3_DEFAULT_TARGETS = ("k", "v", "down")
IA3_FEEDFORWARD = ("down",)
SUMMARY_NAME = "training_summary.json"
LOG_NAME = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "eager", "sdpa")
# attention="auto" picks eager attention under bf16 while a full batch's attention matrices (kept for the
# backward pass) stay under this many bytes; beyond it the backbone's own (memory-efficient) kernel is kept
EAGER_ATTENTION_BYTES = 4 << 30
# Learning rate per method when none is given. Chosen on dev splits carved from training data (never test data):
# results/quality_dev.md, made by benchmarks/quality.py --phase dev.
DEFAULT_LR = {"pedro": 1e-3, "lora": 1e-3, "ia3": 1e-2}
RATIONAL_LR = 3e-4  # bilevel: the rational coefficients' own rate when rational_lr is not given
# epochs=None: enough epochs for about this many optimizer steps, at most MAX_AUTO_EPOCHS (the dev split's
# best epoch is kept, so a few epochs too many cost time, not quality)
TARGET_STEPS = 300
MAX_AUTO_EPOCHS = 10
# dev_split=None: a dev split is carved from the training records when there are at least this many and no
# held-out data was given: DEV_FRACTION of them, between DEV_MIN and DEV_MAX records
DEV_FROM = 200
DEV_FRACTION = 0.1
DEV_MIN, DEV_MAX = 32, 500


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in ``training_summary.json``."""

    data: str = ""
    output_dir: str = ""
    backbone: Optional[str] = None  # None: the default backbone, or the model passed to train()
    method: str = "pedro"
    data_dir: Optional[str] = None  # where task data lives when ``data`` is a task name
    eval_data: Optional[str] = None  # held-out records for periodic evaluation (loss, and accuracy for choices)
    # records carved (seeded) from the training data to evaluate every epoch and keep the best epoch's adapter:
    # None = automatic (see DEV_FROM), 0 = none, a fraction (< 1) or a record count
    dev_split: Optional[float] = None
    limit: Optional[int] = None  # use the first N training records (after a seeded shuffle)
    # PEDRO
    r: int = 8
    pooler: str = "last"
    activation: str = "gelu"
    targets: tuple[str, ...] = ("q", "v", "up")
    pool_source: str = "normed"
    share_generator: bool = False
    rational_lr: Optional[float] = None  # learning rate of the rational activation's coefficients
    bias_lr: Optional[float] = None  # learning rate of the generators' Up bias (the prompt-independent scale part)
    # rational coefficients trained on dev-split batches, the generators on training batches, alternating at every
    # step (first-order DARTS, as the papers do); needs activation="rational" and held-out data
    bilevel: bool = False
    # LoRA / (IA)3
    lora_r: int = 8
    lora_alpha: Optional[int] = None  # default 2 * lora_r
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")
    ia3_targets: tuple[str, ...] = IA3_DEFAULT_TARGETS
    match_params: Optional[str] = None  # "pedro" or a parameter count: size this method to it
    # data
    max_length: int = 512
    overflow: str = "truncate"
    padding_side: str = "right"
    # optimisation
    epochs: Optional[float] = None  # None: auto_epochs(training records)
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup: float = 0.06  # ratio of the steps (<1) or a step count
    precision: str = "auto"  # auto (bf16 where the hardware has it natively, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    # speed (none of these changes what is learned beyond floating-point rounding, except group_by_length,
    # which changes which rows share a batch)
    group_by_length: bool = True  # batches of similar-length rows (little padding), in a random batch order
    response_logits_only: bool = True  # the LM head runs only at the positions the loss reads
    attention: str = "auto"  # auto (eager under bf16 when it fits, else the backbone's) | eager | sdpa
    threads: Optional[int] = None  # torch CPU threads during training (None: torch's default)
    # logging, evaluation, checkpoints
    logging_steps: int = 10
    eval_steps: int = 0
    early_stopping: int = 0  # patience in evaluations; 0 = off
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = False
    report_to: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.dev_split is not None and (self.dev_split < 0 or (self.dev_split >= 1 and self.dev_split != int(self.dev_split))):
            raise ValueError(f"dev_split must be 0, a fraction below 1 or a whole record count, got {self.dev_split}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("targets", "lora_targets", "ia3_targets", "report_to"):
            value = getattr(self, name)
            setattr(self, name, tuple(value.split(",")) if isinstance(value, str) else tuple(value))
        if self.method == "pedro":
            _pedro_config(self)  # a bad PEDRO knob is refused now, not after the backbone has loaded
        if self.bilevel and (self.method != "pedro" or self.activation != "rational"):
            raise ValueError("bilevel optimises PEDRO's rational activation: it needs method pedro, activation rational")


@dataclass
class TrainResult:
    """Where the adapter was written and what the run measured."""

    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ methods


def module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Short target names (q, k, v, o, gate, up, down) -> the module-name suffixes peft matches; anything
    else is passed through as a module name."""
    projections = dict(layer_map(model).projections, down="mlp.down_proj")
    return [projections.get(t, t).rsplit(".", 1)[-1] for t in targets]


def _linear_shapes(model: nn.Module, suffix: str) -> list[tuple[int, int]]:
    shapes = [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(f".{suffix}") and ".layers." in f".{name}"
    ]
    if not shapes:
        raise ValueError(f"no linear module named *.{suffix} in the decoder layers of {type(model).__name__}")
    return shapes


def lora_parameter_count(model: nn.Module, targets: Sequence[str], r: int) -> int:
    """Closed form: r * (in + out) per adapted linear module."""
    return sum(r * (i + o) for suffix in module_names(model, targets) for i, o in _linear_shapes(model, suffix))


def ia3_parameter_count(model: nn.Module, targets: Sequence[str]) -> int:
    """Closed form: one scale per output feature (per input feature for the feed-forward down-projection)."""
    total = 0
    for target, suffix in zip(targets, module_names(model, targets)):
        total += sum(i if target in IA3_FEEDFORWARD else o for i, o in _linear_shapes(model, suffix))
    return total


def _pedro_config(cfg: TrainConfig, r: int | None = None) -> PedroConfig:
    return PedroConfig(
        r=cfg.r if r is None else r,
        pooler=cfg.pooler,
        activation=cfg.activation,
        targets=list(cfg.targets),
        pool_source=cfg.pool_source,
        share_generator=cfg.share_generator,
    )


def match_sizes(cfg: TrainConfig, model: nn.Module) -> tuple[TrainConfig, int]:
    """The config with this method's size chosen so its trainable count is as close as possible to the
    budget (``match_params``: "pedro" = PEDRO's count under the same config, or a number), and the budget.

    LoRA and PEDRO scale linearly in their rank; (IA)3 has no size knob, so the closest subset of
    {q, k, v, o, gate, up, down} is taken (it cannot reach budgets above all seven modules' widths).
    """
    if cfg.match_params is None:
        raise ValueError("match_sizes needs cfg.match_params")
    if str(cfg.match_params) == "pedro":
        budget = count_trainable_parameters(_pedro_config(cfg), model)
    else:
        budget = int(cfg.match_params)
    if budget < 1:
        raise ValueError(f"match_params must be positive, got {cfg.match_params!r}")
    changes: dict[str, Any]
    if cfg.method == "pedro":
        one, two = (count_trainable_parameters(_pedro_config(cfg, r), model) for r in (1, 2))
        changes = {"r": max(1, round(1 + (budget - one) / (two - one)))}
    elif cfg.method == "lora":
        per_rank = lora_parameter_count(model, cfg.lora_targets, 1)
        changes = {"lora_r": max(1, round(budget / per_rank))}
    else:
        names = ("q", "k", "v", "o", "gate", "up", "down")
        subsets = (s for n in range(1, len(names) + 1) for s in itertools.combinations(names, n))
        changes = {"ia3_targets": min(subsets, key=lambda s: (abs(ia3_parameter_count(model, s) - budget), len(s)))}
    fields_ = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return TrainConfig(**{**fields_, **changes, "match_params": None}), budget


def expected_parameter_count(cfg: TrainConfig, model: nn.Module) -> int:
    """Closed-form trainable parameters of ``cfg``'s method on ``model``."""
    if cfg.method == "pedro":
        return count_trainable_parameters(_pedro_config(cfg), model)
    if cfg.method == "lora":
        return lora_parameter_count(model, cfg.lora_targets, cfg.lora_r)
    return ia3_parameter_count(model, cfg.ia3_targets)


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
            target_modules=module_names(model, cfg.lora_targets),
        )
    else:
        config = peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=module_names(model, cfg.ia3_targets),
            feedforward_modules=module_names(model, [t for t in cfg.ia3_targets if t in IA3_FEEDFORWARD]),
        )
    _forget_gguf_quantization(model)
    return peft.get_peft_model(model, config)


def _fp32_trainable(model: nn.Module) -> None:
    """Adapter weights are trained in fp32 whatever the backbone's dtype (they are the optimizer's master
    weights; autocast computes with bf16 copies). PEDRO builds its generators in fp32 and peft upcasts LoRA
    and (IA)3 weights itself; this catches anything that came out in half precision anyway."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _forget_gguf_quantization(model: nn.Module) -> None:
    """A GGUF backbone is dequantised to float at load, but transformers keeps its GGUF "quantizer" marker
    and Trainer then refuses to train it; the weights are plain float tensors, so drop the stale marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method).lower().endswith("gguf"):
        model.hf_quantizer = None
        model.is_quantized = False


def size_report(model: nn.Module, cfg: TrainConfig, budget: int | None = None) -> list[dict[str, Any]]:
    """``cfg``'s method as configured, and the other two of PEDRO, LoRA (this config's targets) and (IA)3 sized
    to ``budget`` (default: ``cfg``'s own count), with each count relative to it: the side-by-side counts
    ``--match-params`` prints."""
    budget = budget or expected_parameter_count(cfg, model)
    rows = []
    for method in METHODS:
        other = TrainConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "method": method, "bilevel": False})
        if method != cfg.method:
            other, _ = match_sizes(TrainConfig(**{**asdict(other), "match_params": str(budget)}), model)
        count = expected_parameter_count(other, model)
        size = {"pedro": f"r={other.r}", "lora": f"r={other.lora_r} on {','.join(other.lora_targets)}",
                "ia3": f"on {','.join(other.ia3_targets)}"}[method]
        rows.append({"method": method, "size": size, "trainable": count, "vs_budget": count / budget - 1})
    return rows


# ------------------------------------------------------------------------------------------ trainer


def _is_up_bias(name: str) -> bool:
    return ".pedro_generator." in name and name.endswith(".up.bias")


def _is_rational(name: str) -> bool:
    return ".act.numerator" in name or ".act.denominator" in name


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool: the positions whose logits the causal-LM loss reads (position t predicts label t + 1), and
    the (N,) targets at those positions, in the row-major order of ``hidden[mask]``."""
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    return keep, targets[keep[:, :-1]]


def accepts_logits_mask(model: nn.Module) -> bool:
    """Whether the causal LM under ``model`` (PEFT-wrapped or not) slices its LM-head input with a boolean
    ``logits_to_keep`` mask (transformers' ``slice_logits_to_keep``, used by every architecture PEDRO supports)."""
    import inspect

    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class PedroTrainer(Trainer):
    """Trainer with a separate learning rate for rational-activation coefficients, atomic checkpoints,
    length-grouped batches, and the LM head run only where the loss reads it."""

    def __init__(
        self,
        *args: Any,
        rational_lr: float | None = None,
        bias_lr: float | None = None,
        bilevel_rows: Sequence[dict[str, Any]] | None = None,
        group_by_length: bool = False,
        response_logits_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rational_lr = rational_lr
        self.bias_lr = bias_lr
        self._bilevel = _Bilevel(self, bilevel_rows) if bilevel_rows else None
        self.group_by_length = group_by_length
        self.response_logits_only = response_logits_only and accepts_logits_mask(self.model)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler([len(row["input_ids"]) for row in dataset], self.args.train_batch_size,
                                    seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The usual causal-LM loss, with logits computed only at the positions that predict a supervised
        token: with prompt-masked labels (SFT) that is a few positions per row, and the LM head (vocab x d) plus
        its softmax over every prompt position was about a quarter of a SmolLM2 training step."""
        fast = (
            self.response_logits_only
            and "labels" in inputs
            and self.label_smoother is None
            and self.compute_loss_func is None
            and (not return_outputs or self.args.prediction_loss_only)
        )
        if fast:
            keep, targets = supervised_positions(inputs["labels"])
            inputs = {**inputs, "logits_to_keep": keep, "shift_labels": targets}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """With bilevel: first the rational coefficients' step on a dev batch, then the usual step."""
        if self._bilevel is not None:
            self._bilevel.step(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with PEDRO's rational coefficients and Up biases moved to groups of their own
        learning rate when one is given (the scheduler scales every group alike); with bilevel the rational
        coefficients are left out (their own optimizer steps them on dev batches)."""
        optimizer = super().create_optimizer(model)
        rational_lr = None if self._bilevel is not None else self.rational_lr
        for key, lr, belongs in (("pedro_rational", rational_lr, _is_rational), ("pedro_bias", self.bias_lr, _is_up_bias)):
            if (lr is None and not (key == "pedro_rational" and self._bilevel)) or any(g.get(key) for g in optimizer.param_groups):
                continue
            chosen = {id(p) for n, p in self.model.named_parameters() if p.requires_grad and belongs(n)}
            if chosen:
                moved = [p for g in optimizer.param_groups for p in g["params"] if id(p) in chosen]
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in chosen]
                if lr is not None:
                    optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0, key: True})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter only: the backbone is frozen, so its embeddings are never saved (which also stops
        PEFT from looking the backbone up online to decide whether they changed)."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, save_embedding_layers=False)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _get_output_dir(self, trial: Any) -> str:
        return getattr(self, "_staging", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write checkpoint-N into a hidden staging folder, then rename it into place: a kill at any moment
        leaves either the previous checkpoints or the complete new one, never a partial one."""
        run_dir = self.args.output_dir
        self._staging = tempfile.mkdtemp(prefix=".staging-", dir=run_dir)
        try:
            super()._save_checkpoint(model, trial)
            name = f"checkpoint-{self.state.global_step}"
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(self._staging, name), final)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            self.state.best_model_checkpoint = best if os.path.isdir(best) else self.state.best_model_checkpoint
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )


class _Bilevel:
    """The alternating update of the papers (first-order DARTS): before each training step, one Adam step on the
    rational coefficients alone, on the loss of the next dev batch at the current generator weights."""

    def __init__(self, trainer: Trainer, rows: Sequence[dict[str, Any]]) -> None:
        self.trainer = trainer
        self.rows = list(rows)
        self.order = random.Random(trainer.args.seed)
        self.queue: list[int] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []

    def _batch(self) -> dict[str, Any]:
        size = self.trainer.args.train_batch_size
        if len(self.queue) < size:
            fresh = list(range(len(self.rows)))
            self.order.shuffle(fresh)
            self.queue += fresh
        picked, self.queue = self.queue[:size], self.queue[size:]
        batch = self.trainer.data_collator([self.rows[i] for i in picked])
        return {k: v.to(self.trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def step(self, model: nn.Module) -> None:
        if self.optimizer is None:
            self.params = [p for n, p in model.named_parameters() if p.requires_grad and _is_rational(n)]
            if not self.params:
                raise ValueError("bilevel: the model has no rational activation coefficients")
            lr = self.trainer.rational_lr if self.trainer.rational_lr is not None else RATIONAL_LR
            # DARTS' architecture optimizer: Adam with beta1 0.5 and a small weight decay
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.5, 0.999), weight_decay=1e-3)
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(model, self._batch())
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        self.optimizer.step()
        for p in self.params:
            p.grad = None


class ProgressAndLog(TrainerCallback):
    """A tqdm bar with loss, tokens/s and ETA, and every log record appended to a JSONL file."""

    def __init__(self, log_path: Path, show: bool) -> None:
        self.log_path = log_path
        self.show = show
        self.bar = None
        self.start = 0.0
        self.tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
        from tqdm.auto import tqdm

        self.start = time.perf_counter()
        self.tokens0 = state.num_input_tokens_seen
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, disable=not self.show, desc="train")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def tokens_per_second(self, state: Any) -> float:
        elapsed = time.perf_counter() - self.start
        return (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        record = {"step": state.global_step, "epoch": state.epoch, **(logs or {}),
                  "tokens_per_s": round(self.tokens_per_second(state), 1)}
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()


def save_adapter_atomic(
    model: peft.PeftModel, output_dir: Path, backbone: str | None = None, prompts: str | None = None
) -> None:
    """save_pretrained into a temp folder next to ``output_dir``, then rename each file into place.
    ``backbone`` is recorded as the config's base model, so ``pedro eval --adapter DIR`` can load it;
    ``prompts`` (pedro.data.prompt_format) with the weights, so serving encodes prompts as training did."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    if backbone is not None:
        model.peft_config[model.active_adapter].base_model_name_or_path = backbone
    try:
        model.save_pretrained(staging, save_embedding_layers=False)  # PEFT would look the backbone up online
        if prompts is not None:
            record_prompt_format(staging, prompts)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU with bf16, or on a CPU with native bf16 matmuls (AVX512-BF16 / AMX, the
    test ``pedro.backbones.resolve_dtype("auto")`` uses; there bf16 GEMMs take about a third of their fp32
    time), else ``fp32``. Other values are returned as they are."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


def _precision(precision: str) -> dict[str, bool]:
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


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


def carve_dev(records: list[Example], dev_split: float | None, limit: int | None = None) -> tuple[list[Example], list[Example]]:
    """(dev, train): the first records of the (already shuffled) list held out for choosing the best epoch.

    ``dev_split`` None sizes it automatically from the records that will be trained on (``limit`` or all),
    0 turns it off, a fraction or a count sets it."""
    base = min(limit, len(records)) if limit else len(records)
    if dev_split is None:
        n = min(DEV_MAX, max(DEV_MIN, round(DEV_FRACTION * base))) if base >= DEV_FROM else 0
    else:
        n = round(dev_split * base) if dev_split < 1 else int(dev_split)
    if n >= len(records):
        raise ValueError(f"dev_split {dev_split} would hold out {n} of {len(records)} records, leaving none to train on")
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
        raise ValueError(f"the records have too few distinct prompts to hold out a dev split of {n}: pass --dev-split 0")
    return [r for i, r in enumerate(records) if i in held], [r for i, r in enumerate(records) if i not in held]


def _is_choice_data(examples: Sequence[Example] | None) -> bool:
    from pedro.evaluate import is_choice_data

    return bool(examples) and is_choice_data(examples)


def train(
    config: TrainConfig | None = None,
    *,
    model: nn.Module | None = None,
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
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if examples is None and not cfg.data:
        raise ValueError("give training data: a JSONL file, a datasets folder, or a task name")
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    # data problems are reported before minutes go into loading a backbone
    records = list(examples) if examples is not None else load_records(cfg.data, "train", cfg.data_dir)
    held_out = list(eval_examples) if eval_examples is not None else None
    if held_out is None and cfg.eval_data:
        held_out = load_records(cfg.eval_data, "test", cfg.data_dir)
    loaded_here = model is None
    precision = resolve_precision(cfg.precision)
    if loaded_here:
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
        _print_sizes(sizes, cfg.method, budget)

    random.Random(cfg.seed).shuffle(records)
    dev: list[Example] = []
    if held_out is None:
        dev, records = carve_dev(records, cfg.dev_split, cfg.limit)
        held_out = dev or None
    records = records[: cfg.limit] if cfg.limit else records
    epochs = cfg.epochs if cfg.epochs is not None else auto_epochs(len(records), cfg.batch_size * cfg.grad_accum)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    if cfg.progress and (cfg.epochs is None or cfg.lr is None or dev):
        print("defaults: " + ", ".join(
            ([f"{epochs:g} epochs for {len(records)} records (--epochs)"] if cfg.epochs is None else [])
            + ([f"lr {lr:g} for {cfg.method} (--lr)"] if cfg.lr is None else [])
            + ([f"{len(dev)} records held out as a dev split, evaluated every epoch, best epoch kept (--dev-split)"]
               if dev else [])))
    rows, report = tokenize_examples(records, tokenizer, cfg.max_length, cfg.overflow)
    eval_rows, eval_report = None, None
    if held_out is not None:
        eval_rows, eval_report = tokenize_examples(held_out, tokenizer, cfg.max_length, cfg.overflow)
    if cfg.progress:
        print(f"train data: {report}" + (f"\neval data: {eval_report}" if eval_report else ""))

    attention = _attention(cfg, precision, model, max(len(row["input_ids"]) for row in rows))
    previous_attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention is not None and attention != previous_attention:
        model.set_attn_implementation(attention)
    peft_model = attach_adapter(model, cfg)
    _fp32_trainable(peft_model)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    peft_model.train()
    checkpoint_dir = output_dir / CHECKPOINTS
    evaluating = eval_rows is not None
    if cfg.early_stopping and not evaluating:
        raise ValueError("early_stopping needs held-out data (eval_data, eval_examples or a dev split)")
    if cfg.bilevel and not evaluating:
        raise ValueError("bilevel needs held-out data for the rational coefficients' steps (a dev split or eval_data)")
    choices = evaluating and _is_choice_data(held_out)
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
        save_steps=cfg.eval_steps or cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy=strategy,
        eval_steps=cfg.eval_steps or None,
        load_best_model_at_end=evaluating,
        metric_for_best_model=("eval_accuracy" if choices else "eval_loss") if evaluating else None,
        greater_is_better=choices if evaluating else None,
        seed=cfg.seed,
        remove_unused_columns=False,  # Trainer would drop prompt_lengths, which PEDRO's forward needs
        include_num_input_tokens_seen="non_padding",
        report_to=list(cfg.report_to) or "none",
        disable_tqdm=True,  # our own bar (ProgressAndLog) shows loss and tokens/s
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        prediction_loss_only=True,  # evaluation reports the loss; keeping every batch's logits is wasted memory
        **_precision(precision),
    )
    collator = Collator(tokenizer.pad_token_id, cfg.padding_side, with_prompt_lengths=cfg.method == "pedro")
    progress = ProgressAndLog(output_dir / LOG_NAME, cfg.progress)
    extra: list[TrainerCallback] = [progress, *callbacks]
    if choices:  # accuracy next to the loss; it fills the log record before it is written
        from pedro.evaluate import ChoiceAccuracy

        extra.insert(0, ChoiceAccuracy(held_out, tokenizer, cfg.batch_size))
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
    resume_from = None
    if cfg.resume:
        resume_from = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
        if cfg.progress:
            print(f"resuming from {resume_from}" if resume_from else "no checkpoint to resume from: starting fresh")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        train_start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume_from)
        train_seconds = time.perf_counter() - train_start
        evaluations = [r for r in trainer.state.log_history if "eval_loss" in r]
        final_eval = trainer.evaluate() if eval_rows is not None else {}  # of the adapter kept
    finally:
        torch.set_num_threads(threads)
        if attention is not None and previous_attention is not None and attention != previous_attention:
            model.set_attn_implementation(previous_attention)  # the model passed in is handed back as it was

    save_adapter_atomic(peft_model, output_dir, cfg.backbone or (DEFAULT_BACKBONE if loaded_here else None), prompt_format(tokenizer))
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
        "epochs": epochs,
        "lr": lr,
        "dev_records": len(dev),
        "best": {"metric": args.metric_for_best_model, "value": trainer.state.best_metric,
                 "step": trainer.state.best_global_step} if evaluating else None,
        "evaluations": evaluations,
        "resumed_from": resume_from,
        "train_loss": output.training_loss,
        "final_metrics": {**output.metrics, **final_eval},
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "tokens_per_second": progress.tokens_per_second(trainer.state),
    }
    write_json_atomic(output_dir / SUMMARY_NAME, summary)
    if cfg.progress:
        print(f"adapter written to {output_dir} ({trainer.state.global_step} steps, {train_seconds:.0f}s, "
              f"{summary['tokens_per_second']:.0f} tokens/s)")
    return TrainResult(output_dir=output_dir, summary=summary)


# ------------------------------------------------------------------------------------------ two tenants

_TEAMS = {
    "billing": ["I was charged twice for my subscription", "my invoice shows the wrong amount",
                "please refund the extra fee on my card", "why did my monthly price go up",
                "the payment failed but money left my account", "I need a copy of last month's receipt"],
    "shipping": ["my parcel has not arrived after two weeks", "the tracking number does not work",
                 "the box came damaged and wet", "can you deliver to my office instead",
                 "the courier left my package at the wrong house", "how long does delivery to Spain take"],
    "account": ["I cannot log in after changing my password", "please delete my account and data",
                "how do I change the email on my profile", "my account was locked after three attempts",
                "I want to add a second user to my plan", "the verification code never reaches my phone"],
    "technical": ["the app crashes when I open settings", "the website shows an error 500",
                  "the sync between my laptop and phone stopped", "the export to PDF produces empty pages",
                  "notifications stopped working after the update", "the search returns nothing for any query"],
}
_OPENERS = ["Hello,", "Hi team,", "Urgent:", "Good morning.", "Dear support,", "Hey,"]
_CLOSERS = ["Thanks.", "Please help.", "Regards, Sam", "This is the second time I write.", "", "Cheers"]
_CITIES = ["Lyon", "Porto", "Munich", "Denver", "Osaka", "Dublin", "Krakow", "Seville", "Bergen", "Austin",
           "Leeds", "Turin"]
_ITEMS = ["3 boxes of printer paper", "a standing desk", "12 coffee mugs", "two office chairs", "a laptop stand",
          "500 envelopes", "a whiteboard", "6 monitor cables"]
_ORDER_TEMPLATES = [
    "Order #{n}: {item}, ship to {city} before Friday.",
    "Please send {item} to our {city} branch (ref {n}).",
    "Customer {n} in {city} ordered {item}; express delivery.",
    "Deliver {item} to the warehouse in {city}. PO {n}.",
]


def tenant_datasets(seed: int = 0, n_train: int = 48, n_test: int = 24) -> dict[str, dict[str, list[dict]]]:
    """Two tenants' small data sets, generated (no download, no ../shared): ``acme`` routes support tickets
    to a team (a choice task), ``globex`` extracts an order's destination city in capital letters (exact
    match). Test records are other combinations (of opener, ticket and closer; of template, city and item)
    than the training records."""
    rng = random.Random(seed)
    tickets = [(team, f"{o} {text}. {c}".strip()) for team, texts in _TEAMS.items() for text in texts
               for o, c in zip(_OPENERS, _CLOSERS)]
    rng.shuffle(tickets)
    route = "Route this support ticket to one team: billing, shipping, account or technical.\nTicket: {}"
    acme = [{"prompt": route.format(text), "response": team, "options": list(_TEAMS)} for team, text in tickets]
    orders = []
    for template, city, _ in itertools.product(_ORDER_TEMPLATES, _CITIES, range(2)):
        text = template.format(n=rng.randint(1000, 9999), item=rng.choice(_ITEMS), city=city)
        orders.append({"prompt": f"Extract the destination city of this order, in capital letters.\nOrder: {text}",
                       "response": city.upper()})
    rng.shuffle(orders)
    return {
        "acme": {"train": acme[:n_train], "test": acme[n_train : n_train + n_test]},
        "globex": {"train": [{k: r[k] for k in ("prompt", "response")} for r in orders[:n_train]],
                   "test": orders[n_train : n_train + n_test]},
    }


def demo_tenants(
    output_dir: str | Path, backbone: str = DEFAULT_BACKBONE, epochs: float = 2.0, console: Any = None
) -> list[Path]:
    """Train one small PEDRO adapter per tenant on generated data, print each tenant's test metric before
    (bare backbone) and after (its adapter), generate with each, and return the adapter folders.

    The main job's multi-tenant part: the adapters it writes are what the engine then serves side by side.
    """
    import copy

    from rich.console import Console

    from pedro.data import write_jsonl_atomic
    from pedro.evaluate import evaluate, generate_texts
    from pedro.tasks import get_task

    console = console or Console()
    root = Path(output_dir)
    base, tokenizer = load_backbone(backbone)
    adapters = []
    for tenant, splits in tenant_datasets().items():
        data_dir = root / tenant / "data"
        for split, rows in splits.items():
            write_jsonl_atomic(data_dir / f"{split}.jsonl", rows)
        task = get_task(f"jsonl:{data_dir}")
        task.max_new_tokens = 8
        before = evaluate(base, tokenizer, task, "test", progress=False)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = train(model=model, tokenizer=tokenizer, data=str(data_dir / "train.jsonl"), backbone=backbone,
                       output_dir=str(root / tenant / "adapter"), method="pedro", epochs=epochs, batch_size=4,
                       lr=2e-3, max_length=128, logging_steps=4, progress=False,
                       # the settings the README's recorded demo output was produced with
                       precision="fp32", group_by_length=False)
        after = evaluate(model, tokenizer, task, "test", progress=False)
        prompt = splits["test"][0]["prompt"]
        text = generate_texts(model, tokenizer, [prompt], max_new_tokens=8, progress=False)[0]
        console.print(
            f"[bold]{tenant}[/bold] ({task.kind}, {len(splits['train'])} train / {before['n']} test): "
            f"{task.metric} {before[task.metric]:.2f} before -> {after[task.metric]:.2f} after "
            f"({result.summary['steps']} steps, {time.perf_counter() - start:.0f}s)"
        )
        console.print(f"  > {prompt.splitlines()[-1]}\n  {text}")
        adapters.append(result.output_dir)
        del model
    return adapters


def _print_sizes(rows: list[dict[str, Any]], method: str, budget: int | None = None) -> None:
    """The trained adapter's size; with ``--match-params`` (``budget``), the three methods sized to it."""
    from rich.console import Console
    from rich.table import Table

    if budget is None:
        row = next(r for r in rows if r["method"] == method)
        Console().print(f"trainable parameters: {row['trainable']:,} ({method} {row['size']})")
        return
    table = Table(title=f"trainable parameters at this budget (--match-params: {budget:,})")
    for column in ("method", "size", "trainable", "vs budget"):
        table.add_column(column)
    for row in rows:
        mark = " (training)" if row["method"] == method else ""
        table.add_row(row["method"] + mark, row["size"], f"{row['trainable']:,}", f"{100 * row['vs_budget']:+.1f}%")
    Console().print(table)


__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "attach_adapter",
    "resolve_precision",
    "supervised_positions",
    "demo_tenants",
    "expected_parameter_count",
    "ia3_parameter_count",
    "lora_parameter_count",
    "match_sizes",
    "size_report",
    "tenant_datasets",
    "train",
]
