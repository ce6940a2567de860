"""Score a backbone, with or without an adapter, on a task: batched, with a progress bar.

Choice tasks are scored by constrained log-likelihood ranking: each option's summed token log-probability
after the prompt (no EOS), highest wins. When every option is a single token, one forward over the prompts
scores them all at once (the same numbers, a fraction of the cost); they report accuracy, and macro-F1 when
every example offers the same options (a classification). Generation tasks decode greedily.
Prompts are encoded by ``pedro.data.encode_prompt``, the same tokens the adapter was trained on, and PEDRO's
pooler sees the prompt only (``prompt_lengths`` when the option tokens follow the prompt in one sequence).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from pedro.data import Collator, Example, encode_prompt, encode_response, write_jsonl_atomic
from pedro.model import IGNORE_INDEX
from pedro.tasks import Task, accuracy, get_task, macro_f1


def is_pedro(model: nn.Module) -> bool:
    """True for a PeftModel whose active adapter is PEDRO (it takes ``prompt_lengths``)."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", None)
    return active in configs and str(configs[active].peft_type) == "PEDRO"


def check_scorable(model: nn.Module) -> None:
    """Refuse to score options after a prompt with a model that carries PEDRO layers outside a PeftModel (a
    backbone that ``get_peft_model`` or ``pedro.train`` injected into, then handed back): its forward cannot take
    ``prompt_lengths``, so PEDRO's pooler would read the options with the prompt and every score would be
    quietly wrong."""
    from peft import PeftModel

    from pedro.layer import PedroLayer

    if not isinstance(model, PeftModel) and any(isinstance(m, PedroLayer) for m in model.modules()):
        raise ValueError(
            "this model holds PEDRO layers but is not a PeftModel, so it cannot be told where a prompt ends: "
            "evaluate the PeftModel itself (pedro.train returns it as TrainResult.model) or load the saved "
            "adapter with PeftModel.from_pretrained"
        )


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _bar(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def option_logprobs(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per example, the summed log-probability of each option's tokens given the prompt. The progress bar
    counts examples (an example is done when all its options are scored)."""
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
    options = [[encode_response(tokenizer, o, eos=False) for o in e.options or []] for e in examples]
    if any(not opts for opts in options):
        raise ValueError("a choice example without options")
    scores: list[list[float]] = [[] for _ in examples]
    device = _device(model)
    if all(len(o) == 1 for opts in options for o in opts):
        order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
        bar = _bar(len(examples), "score", progress)
        collate = Collator(tokenizer.pad_token_id, "left", with_prompt_lengths=False)
        for chunk in _batches(order, batch_size):
            batch = collate(
                [{"input_ids": prompts[i], "labels": prompts[i], "prompt_length": len(prompts[i])} for i in chunk]
            )
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits[:, -1]
            logp = logits.float().log_softmax(-1)
            for row, i in enumerate(chunk):
                scores[i] = [logp[row, o[0]].item() for o in options[i]]
            bar.update(len(chunk))
        bar.close()
        return scores
    check_scorable(model)  # options of several tokens follow the prompt in one sequence: PEDRO needs its end
    pairs = [(i, j) for i, opts in enumerate(options) for j in range(len(opts))]
    rows: list[dict[str, Any]] = [
        {
            "input_ids": prompts[i] + options[i][j],
            "labels": [IGNORE_INDEX] * len(prompts[i]) + options[i][j],
            "prompt_length": len(prompts[i]),
        }
        for i, j in pairs
    ]
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]["input_ids"]))
    collate = Collator(tokenizer.pad_token_id, "right", with_prompt_lengths=is_pedro(model))
    flat = [0.0] * len(rows)
    left = [len(opts) for opts in options]  # options still to score, per example
    bar = _bar(len(examples), "score", progress)
    for chunk in _batches(order, batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[k] for k in chunk]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        totals = (logp * (targets != IGNORE_INDEX)).sum(1)
        done = 0
        for row, k in enumerate(chunk):
            flat[k] = totals[row].item()
            left[pairs[k][0]] -= 1
            done += left[pairs[k][0]] == 0
        bar.update(done)
    bar.close()
    for (i, _), value in zip(pairs, flat):
        scores[i].append(value)
    return scores


def choice_metrics(predicted: list[int], examples: Sequence[Example]) -> dict[str, float]:
    """Accuracy, and macro-F1 when the examples share one set of options."""
    return {**accuracy(predicted, list(examples)), **macro_f1(predicted, list(examples))}


def is_choice_data(examples: Sequence[Example]) -> bool:
    """Every example has options and the index of the right one."""
    return bool(examples) and all(e.options and e.label is not None for e in examples)


class ChoiceAccuracy(TrainerCallback):
    """Scores held-out choice examples at every evaluation during training, as ``evaluate`` does (log-likelihood
    ranking of the options), and adds ``eval_accuracy`` (and ``eval_macro_f1``) to the evaluation's metrics.

    It fills the evaluation's log record in ``on_log``, so place it before the callback that writes the log:
    the record written, ``state.log_history``, the metrics ``Trainer.evaluate`` returns and the choice of the
    best checkpoint then all include the accuracy. Scoring runs under the training's autocast dtype.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, batch_size: int = 16) -> None:
        if not is_choice_data(examples):
            raise ValueError("ChoiceAccuracy needs choice examples (options and label)")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # noqa: ANN001 - Trainer's signature
        if not logs or "eval_loss" not in logs or model is None:
            return
        half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(_device(model).type, dtype=half or torch.bfloat16, enabled=half is not None):
                scores = option_logprobs(model, self.tokenizer, self.examples, self.batch_size, progress=False)
        finally:
            model.train(was_training)
        predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
        extra = {f"eval_{k}": v for k, v in choice_metrics(predicted, self.examples).items()}
        if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
            state.log_history[-1].update(extra)
        logs.update(extra)


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of each prompt (formatted as at training), special tokens stripped."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    collate = Collator(tokenizer.pad_token_id, "left", with_prompt_lengths=False)
    texts = [""] * len(encoded)
    bar = _bar(len(encoded), "generate", progress)
    for chunk in _batches(order, batch_size):
        batch = collate(
            [{"input_ids": encoded[i], "labels": encoded[i], "prompt_length": len(encoded[i])} for i in chunk]
        )
        out = model.generate(  # type: ignore[operator]  # a transformers / PEFT model's generate
            input_ids=batch["input_ids"].to(_device(model)),
            attention_mask=batch["attention_mask"].to(_device(model)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(chunk):
            texts[i] = tokenizer.decode(out[row, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return texts


@torch.inference_mode()
def greedy_continuation(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of the token ids ``prompt`` by transformers ``generate`` (on a PEFT model: with its
    adapter), always ``max_new_tokens`` long: EOS does not end it, as with the engine's ``ignore_eos``
    (``min_new_tokens`` would instead forbid EOS, changing the tokens). The reference the engine is checked
    against, one request alone."""
    ids = torch.tensor([prompt], device=_device(model))
    out = model.generate(  # type: ignore[operator]  # a transformers / PEFT model's generate
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task | str,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    predictions_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    examples: Sequence[Example] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on the first ``limit`` examples of ``task``'s ``split`` (or on ``examples``).

    Returns ``{"task", "split", "n", "metric", <metric values>, "seconds"}`` (a choice task's values:
    ``accuracy``, and ``macro_f1`` when every example has the same options); with ``predictions_path``, one
    JSON line per example (prompt, prediction, expected) is written there atomically.
    """
    task = get_task(task, data_dir) if isinstance(task, str) else task
    examples = list(examples) if examples is not None else task.load(split, limit)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        if task.kind == "choice":
            scores = option_logprobs(model, tokenizer, examples, batch_size, progress)
            predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
            metrics: dict[str, float] = choice_metrics(predicted, examples)
            records = [
                {
                    "prompt": e.prompt,
                    "prediction": e.options[p],  # type: ignore[index]
                    "expected": e.options[e.label],  # type: ignore[index]
                    "correct": p == e.label,
                    "scores": s,
                }
                for e, p, s in zip(examples, predicted, scores)
            ]
        else:
            texts = generate_texts(
                model, tokenizer, [e.prompt for e in examples], task.max_new_tokens, batch_size, progress
            )
            metrics = task.score(texts, examples)
            records = [
                {"prompt": e.prompt, "prediction": t, "expected": e.references or [e.response]}
                for e, t in zip(examples, texts)
            ]
    finally:
        model.train(was_training)
    result = {
        "task": task.name,
        "split": split,
        "n": len(examples),
        "metric": task.metric,
        **metrics,
        "seconds": time.perf_counter() - start,
    }
    if predictions_path is not None:
        write_jsonl_atomic(Path(predictions_path), records)
    return result


def load_for_eval(backbone: str | None, adapter: str | None, quiet: bool = False) -> tuple[nn.Module, Any]:
    """The backbone (named, or the one recorded in the adapter's config) with the adapter loaded, if any."""
    from peft import PeftConfig, PeftModel

    from pedro.backbones import DEFAULT_BACKBONE, load_backbone, resolve_backbone
    from pedro.io import local_adapter

    if adapter is not None:
        adapter = str(local_adapter(adapter))
    if backbone is None:
        backbone = PeftConfig.from_pretrained(adapter).base_model_name_or_path if adapter else None
        if backbone:
            try:
                resolve_backbone(backbone)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"{err}. It is the backbone the adapter records (where it was loaded from when the adapter "
                    "was made); pass --backbone NAME (e.g. smollm2-135m) to choose it"
                ) from None
        backbone = backbone or DEFAULT_BACKBONE
    base, tokenizer = load_backbone(backbone, quiet=quiet)
    model: nn.Module = base if adapter is None else PeftModel.from_pretrained(base, adapter)
    model.eval()
    return model, tokenizer
