"""transformers' Trainer as ``pedro train`` uses it: length-grouped batches, the LM head only where the loss reads
it, PEDRO's rational coefficients and Up biases at learning rates of their own (or the rational coefficients
trained bi-level, on dev batches), checkpoints that resume never takes half-written, and a progress bar with a
JSONL log. Trainer is customised through its public surface (overridden public methods and callbacks), and its
batch order through ``pedro.compat.OwnTrainSampler``, the one private hook it has for that."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import peft
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pedro.compat import OwnTrainSampler
from pedro.data import LengthGroupedSampler
from pedro.model import IGNORE_INDEX
from pedro.train_config import RATIONAL_LR


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


def choice_loss(model: nn.Module, inputs: Mapping[str, Any], logits_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The choice objective on a batch of choice rows (``pedro.data.tokenize_choice_examples``): cross-entropy
    of the right option against the others, each scored by its logit at the prompt's last token -- the softmax
    over the options of the log-likelihoods evaluation ranks them by. -> (loss, (B, options) option logits,
    -inf where a row has fewer options). ``logits_mask``: the model takes a boolean ``logits_to_keep``, so the
    LM head runs at the last tokens only."""
    inputs = dict(inputs)
    choice, option_ids, option_mask = inputs.pop("choice"), inputs.pop("option_ids"), inputs.pop("option_mask")
    mask = inputs["attention_mask"]
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last prompt token, on either padding side
    if logits_mask:
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[rows, last] = True
        logits = model(**inputs, logits_to_keep=keep).logits.reshape(len(rows), -1)
    else:
        logits = model(**inputs).logits[rows, last]
    scores = logits.float().gather(1, option_ids).masked_fill(~option_mask, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, choice), scores


class PedroTrainer(OwnTrainSampler, Trainer):
    """Trainer of a PEFT adapter with a separate learning rate for rational-activation coefficients, atomic
    checkpoints, length-grouped batches, and the LM head run only where the loss reads it."""

    model: peft.PeftModel  # Trainer types it as any model or None; this trainer is given a PeftModel

    def __init__(
        self,
        model: peft.PeftModel,
        *args: Any,
        rational_lr: float | None = None,
        bias_lr: float | None = None,
        bilevel_rows: Sequence[dict[str, Any]] | None = None,
        group_by_length: bool = False,
        response_logits_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.rational_lr = rational_lr
        self.bias_lr = bias_lr
        self.bilevel = Bilevel(self, bilevel_rows) if bilevel_rows else None
        self.group_by_length = group_by_length
        self.response_logits_only = response_logits_only and accepts_logits_mask(self.model)

    def train_sampler(self, dataset: Sequence[Mapping[str, Any]]) -> LengthGroupedSampler | None:
        """With ``group_by_length``, pedro's own length-grouped order: Trainer's (train_sampling_strategy
        "group_by_length") serves each group longest batch first in torch's global random order, so batch length
        follows a schedule and a resumed run does not see the batches of a straight one."""
        if not self.group_by_length:
            return None
        return LengthGroupedSampler(
            [len(row["input_ids"]) for row in dataset], self.args.train_batch_size, seed=self.args.seed
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The choice objective on choice rows (``choice_loss``); otherwise the usual causal-LM loss, with
        logits computed only at the positions that predict a supervised token: with prompt-masked labels (SFT)
        that is a few positions per row, and the LM head (vocab x d) plus its softmax over every prompt position
        was about a quarter of a SmolLM2 training step."""
        if "choice" in inputs:
            loss, scores = choice_loss(model, inputs, self.response_logits_only)
            return (loss, {"logits": scores}) if return_outputs else loss
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
        if self.bilevel is not None:
            self.bilevel.step(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with PEDRO's rational coefficients and Up biases moved to groups of their own
        learning rate when one is given (the scheduler scales every group alike); with bilevel the rational
        coefficients are left out (their own optimizer steps them on dev batches)."""
        optimizer = super().create_optimizer(model)
        rational_lr = None if self.bilevel is not None else self.rational_lr
        for key, lr, belongs in (
            ("pedro_rational", rational_lr, _is_rational),
            ("pedro_bias", self.bias_lr, _is_up_bias),
        ):
            if (lr is None and not (key == "pedro_rational" and self.bilevel)) or any(
                g.get(key) for g in optimizer.param_groups
            ):
                continue
            chosen = {id(p) for n, p in self.model.named_parameters() if p.requires_grad and belongs(n)}
            if chosen:
                moved = [p for g in optimizer.param_groups for p in g["params"] if id(p) in chosen]
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in chosen]
                if lr is not None:
                    optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0, key: True})
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter only: the backbone is frozen, so its embeddings are never saved (which also stops
        PEFT from looking the backbone up online to decide whether they changed)."""
        output_dir = output_dir or self.args.output_dir
        assert output_dir is not None  # TrainingArguments fills in a default
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, save_embedding_layers=False)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


# Trainer writes checkpoint-N in place, so a kill during the write leaves a partial one; this file, written once
# Trainer has finished, tells a complete checkpoint from a partial one
COMPLETE = "pedro-checkpoint-complete"


def checkpoint_path(args: Any, state: Any) -> Path:
    """The folder Trainer saves the checkpoint of ``state``'s step in: each callback that adds to a checkpoint
    writes there."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class MarkCompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it (``on_save`` runs after the write). The
    mark records the training time spent up to that checkpoint, wall and CPU, so a run resumed from it reports
    the time of the whole run, not of its last piece. CPU time (all of the process's threads) does not advance
    while the process is stopped, so it measures a run that was paused or shared a machine more fairly."""

    def __init__(self) -> None:
        # spent before this process, up to the checkpoint it resumed from; None: not recorded, so unknown
        self.before: dict[str, float | None] = {"train_seconds": 0.0, "train_cpu_seconds": 0.0}
        self.start = (time.perf_counter(), time.process_time())
        self.resumed_at = 0  # the step training started from in this process

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
        self.start = (time.perf_counter(), time.process_time())
        self.resumed_at = state.global_step  # Trainer has restored a resumed run's state by now
        mark = checkpoint_path(args, state) / COMPLETE
        if state.global_step and mark.is_file():
            try:  # a time the mark does not hold (an empty mark: written before marks held times) is unknown
                recorded = json.loads(mark.read_text() or "{}")
                self.before = {key: float(recorded[key]) if key in recorded else None for key in self.before}
            except (ValueError, AttributeError, TypeError):  # not a JSON object of numbers: the time is unknown
                self.before = dict.fromkeys(self.before)

    def seconds(self) -> float | None:
        before = self.before["train_seconds"]
        return None if before is None else before + time.perf_counter() - self.start[0]

    def cpu_seconds(self) -> float | None:
        before = self.before["train_cpu_seconds"]
        return None if before is None else before + time.process_time() - self.start[1]

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        path = checkpoint_path(args, state)
        if path.is_dir():
            spent = {"train_seconds": self.seconds(), "train_cpu_seconds": self.cpu_seconds()}
            (path / COMPLETE).write_text(json.dumps({k: round(v, 3) for k, v in spent.items() if v is not None}))


def logged_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """A resumed run's mean training loss over the whole run, from the losses Trainer logged (each the mean of
    the steps since the previous log), weighted by the steps each covers; at a resume, the steps between the last
    log and the checkpoint were not logged, and their weight goes to the first log after it. Trainer's own
    ``training_loss`` covers only the steps run since the resume (0.0 when none were)."""
    total = steps = previous = 0
    for record in log_history:
        if "loss" in record:
            total += record["loss"] * (record["step"] - previous)
            steps += record["step"] - previous
            previous = record["step"]
    return total / steps if steps else None


class CheckpointEvery(TrainerCallback):
    """A checkpoint every ``steps`` steps besides the evaluations' own. Trainer ties its checkpoints to its
    evaluations when it keeps the best one, so a run evaluated once an epoch could otherwise resume only from
    an epoch's end, and a run killed more often than an epoch lasts would never finish."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
        if state.global_step % self.steps == 0:
            control.should_save = True


def restore_finished_run(trainer: Trainer, checkpoint: str) -> bool:
    """Where ``checkpoint`` is a run's last step (a run killed after training, before its adapter was written),
    puts the trainer where the straight run ended -- its state, and the adapter it kept (the best checkpoint's
    when keeping the best) -- and returns True. Trainer itself, resumed from a last step that ends an epoch part
    way (``max_steps``), trains one step more than the run planned."""
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    if state.global_step < state.max_steps:
        return False
    kept = (
        state.best_model_checkpoint
        if trainer.args.load_best_model_at_end and state.best_model_checkpoint
        else checkpoint
    )
    weights = load_file(str(Path(kept) / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(trainer.model, weights)
    trainer.state = state
    return True


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in ``folder`` that Trainer finished writing; newer partial ones (a kill during the
    write) are deleted, so ``resume`` never starts from half a checkpoint."""
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
        if (path / COMPLETE).is_file():
            return str(path)
        shutil.rmtree(path)
    return None


BILEVEL_STATE = "pedro-bilevel.pt"


class Bilevel(TrainerCallback):
    """The alternating update of the papers (first-order DARTS): before each training step, one Adam step on the
    rational coefficients alone, on the loss of the next dev batch at the current generator weights. Its own
    optimizer, the dev batches' order and the place in it are saved with each checkpoint (``on_save``, before
    the mark that completes the checkpoint) and restored with it, so a resumed run equals the unbroken one."""

    def __init__(self, trainer: PedroTrainer, rows: Sequence[dict[str, Any]]) -> None:
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

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.params = [p for n, p in model.named_parameters() if p.requires_grad and _is_rational(n)]
            if not self.params:
                raise ValueError("bilevel: the model has no rational activation coefficients")
            lr = self.trainer.rational_lr if self.trainer.rational_lr is not None else RATIONAL_LR
            # DARTS' architecture optimizer: Adam with beta1 0.5 and a small weight decay
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.5, 0.999), weight_decay=1e-3)
        return self.optimizer

    def step(self, model: nn.Module) -> None:
        optimizer = self._optimizer(model)
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(model, self._batch())
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        optimizer.step()
        for p in self.params:
            p.grad = None

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
        path = checkpoint_path(args, state)
        if path.is_dir():
            optimizer = None if self.optimizer is None else self.optimizer.state_dict()
            torch.save(
                {"optimizer": optimizer, "queue": self.queue, "order": self.order.getstate()}, path / BILEVEL_STATE
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        """A resumed run (Trainer has restored its state by now) takes up the checkpoint's bi-level state; a
        checkpoint saved without one restarts the coefficients' moments and dev order."""
        saved = checkpoint_path(args, state) / BILEVEL_STATE
        if not state.global_step or not saved.is_file():
            return
        restored = torch.load(saved, weights_only=True)
        self.queue, self.optimizer = list(restored["queue"]), None
        self.order.setstate(restored["order"])
        if restored["optimizer"] is not None:
            self._optimizer(model if model is not None else self.trainer.model).load_state_dict(restored["optimizer"])


class ProgressAndLog(TrainerCallback):
    """A tqdm bar with loss, tokens/s and ETA, and every log record appended to a JSONL file. Tokens/s is the
    training steps' own rate: the time of evaluations and checkpoints between steps is not counted."""

    def __init__(self, log_path: Path, show: bool) -> None:
        self.log_path = log_path
        self.show = show
        self.bar = None
        self.step_started = 0.0
        self.stepping = 0.0  # seconds inside training steps (step begin to step end) in this process
        self.tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
        from tqdm.auto import tqdm

        self.tokens0 = state.num_input_tokens_seen
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, disable=not self.show, desc="train")

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.stepping += time.perf_counter() - self.step_started
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def tokens_per_second(self, state: Any) -> float:
        return (state.num_input_tokens_seen - self.tokens0) / self.stepping if self.stepping > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            **(logs or {}),
            "tokens_per_s": round(self.tokens_per_second(state), 1),
        }
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()
