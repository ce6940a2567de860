"""The quality study: PEDRO against parameter-matched LoRA, (IA)3 and the bare backbone, in two phases.

    python benchmarks/quality.py --phase dev   # the choices, on dev splits carved from the *train* splits
                                               #   -> results/quality_dev.{json,md}
    python benchmarks/quality.py               # the study on the test splits -> results/quality.{json,md,png}
    python benchmarks/quality.py --quick       # tiny sizes: the study's code path in minutes

The dev phase trains each variant (learning rates per method, PEDRO's options) for DEV_EPOCHS epochs and scores
it on a dev split at every epoch; its curves set `pedro train`'s defaults (DEFAULT_LR, auto_epochs). The study
then trains every method with exactly those defaults (`pedro train` with nothing but the data: epochs sized to
the data, a dev split carved from the training records choosing the best epoch, the method's learning rate) on
SIZES[task].train records, three seeds, and scores the test split, which no choice ever looked at.

The backbone is the default SmolLM2-135M, loaded once (bf16 where the CPU has native bf16, as `pedro train`
loads it); each run trains a fresh adapter on a deep copy. Every finished run is appended to a JSONL file, so an
interrupted study resumes where it stopped and the tables are rebuilt from whatever has finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import pedro
from pedro.data import write_json_atomic
from pedro.evaluate import evaluate
from pedro.tasks import get_task
from pedro.train import DEFAULT_LR, resolve_precision, train


@dataclass(frozen=True)
class Size:
    train: int  # training records given to `pedro train` (its default dev split is carved from them)
    eval: int  # test examples scored
    max_length: int
    overflow: str = "truncate"
    dev_split: int | None = None  # `pedro train`'s (None: its default, which carves none from under 200 records)


# 1,112 records: after the default dev split (10 %, 111 records) at least 1,000 are trained on; RTE, which has
# fewer, uses its whole training split (2,490 records, 249 of them the dev split). Test sets are used whole where
# they have at most 1,000 items (SST-2's 872, RTE's 277, TREC's 500, CoNaLa's 500); E2E scores its first 500 of
# 630 test inputs.
SIZES = {
    "sst2": Size(train=1112, eval=872, max_length=128),
    "rte": Size(train=2490, eval=277, max_length=256, overflow="drop"),
    "trec": Size(train=1112, eval=500, max_length=96),
    "e2e": Size(train=1112, eval=500, max_length=160),
    "conala": Size(train=1112, eval=500, max_length=160),
    "gsm8k": Size(train=1112, eval=500, max_length=384),  # not in the default --tasks: a 135M model scores ~0
}
# a dev split even at these sizes, so every method's code path runs (best-epoch choice, bi-level steps)
QUICK = {
    name: Size(train=16, eval=8, max_length=s.max_length, overflow=s.overflow, dev_split=4) for name, s in SIZES.items()
}
GEN_TOKENS = {"gsm8k": 160, "e2e": 64, "conala": 64}
# Each method as `pedro train --method M` runs it: everything else is the default. The first three are the
# study's core (--methods' default); the others add LoRA's own default, the papers' configuration of PEDRO and a
# second budget (PEDRO at half the generator rank against LoRA matched to that), run once the core has finished.
METHODS: dict[str, dict[str, Any]] = {
    "pedro": dict(method="pedro"),
    "lora_matched": dict(method="lora", match_params="pedro", lora_targets=("q", "v")),
    "ia3": dict(method="ia3"),
    "lora_r8_qv": dict(method="lora", lora_r=8, lora_targets=("q", "v")),
    # the papers' own set-up where it is known: the attention pooler (the group's related work), the rational
    # activation trained bi-level on dev batches
    "pedro_paper": dict(method="pedro", pooler="attention", activation="rational", bilevel=True),
    "pedro_r4": dict(method="pedro", r=4),
    "lora_matched_r4": dict(method="lora", match_params="pedro", r=4, lora_targets=("q", "v")),
}
CORE = ("pedro", "lora_matched", "ia3")
# paired comparisons: (PEDRO configuration, baseline)
PAIRS = (
    ("pedro", "lora_matched"),
    ("pedro", "ia3"),
    ("pedro", "lora_r8_qv"),
    ("pedro_paper", "lora_matched"),
    ("pedro_r4", "lora_matched_r4"),
)
BOOTSTRAP = 1000
# a checkpoint every SAVE_STEPS steps besides each epoch's: an RTE epoch in fp32 on a 2-core CPU outlasts what is
# left of a session; resuming from them is bit-exact, so they change no result
SAVE_STEPS = 40


def load_base() -> tuple[Any, Any]:
    """The backbone as `pedro train` holds it: bf16 where training runs under bf16 autocast."""
    dtype = torch.bfloat16 if resolve_precision("auto") == "bf16" else torch.float32
    return pedro.load_backbone("smollm2-135m", dtype=dtype, quiet=True)


# ------------------------------------------------------------------ the dev phase: choices made on dev splits
# Each variant trains on DEV_SIZES[task].train records of the task's *train* split and is scored on a dev split
# carved from the same train split (records sharing a prompt kept together), at every epoch: the curves choose
# the default learning rates, epochs and PEDRO's options. The test split is never read in this phase.
DEV_SIZES = {
    "trec": Size(train=400, eval=200, max_length=96),
    "e2e": Size(train=400, eval=60, max_length=160),
    "sst2": Size(train=400, eval=200, max_length=128),
}
DEV_EPOCHS = 5
PEDRO_BASE = dict(method="pedro", r=8)
LORA_MATCHED = dict(method="lora", match_params="pedro", lora_targets=("q", "v"))
DEV_VARIANTS: dict[str, dict[str, Any]] = {  # in the order they run: the defaults' comparison first
    "pedro lr=1e-3": dict(PEDRO_BASE, lr=1e-3),
    "lora_matched lr=1e-3": dict(LORA_MATCHED, lr=1e-3),
    "ia3 lr=1e-2": dict(method="ia3", lr=1e-2),
    "pedro lr=1e-3 bias_lr=1e-2": dict(PEDRO_BASE, lr=1e-3, bias_lr=1e-2),
    "pedro lr=3e-3": dict(PEDRO_BASE, lr=3e-3),
    "lora_matched lr=3e-3": dict(LORA_MATCHED, lr=3e-3),
    "ia3 lr=3e-2": dict(method="ia3", lr=3e-2),
    "pedro rational": dict(PEDRO_BASE, lr=1e-3, activation="rational"),
    "pedro rational bilevel": dict(PEDRO_BASE, lr=1e-3, activation="rational", bilevel=True),
    "pedro mean pooler": dict(PEDRO_BASE, lr=1e-3, pooler="mean"),
    "pedro attention pooler": dict(PEDRO_BASE, lr=1e-3, pooler="attention"),
    "pedro raw pool source": dict(PEDRO_BASE, lr=1e-3, pool_source="raw"),
    "pedro shared generator": dict(PEDRO_BASE, lr=1e-3, share_generator=True),
    "pedro targets q,k,v,o,gate,up": dict(PEDRO_BASE, lr=1e-3, targets=("q", "k", "v", "o", "gate", "up")),
    "pedro r=16": dict(PEDRO_BASE, lr=1e-3, r=16),
    "pedro normalized pooled": dict(PEDRO_BASE, lr=1e-3, normalize_pooled=True),
    "pedro scale bound 1": dict(PEDRO_BASE, lr=1e-3, scale_bound=1.0),
    # choice tasks only: cross-entropy over the options instead of the label word's LM loss
    "pedro choice objective": dict(PEDRO_BASE, lr=1e-3, objective="choice"),
    "lora_matched choice objective": dict(LORA_MATCHED, lr=1e-3, objective="choice"),
}


def dev_split(examples: list, n_dev: int, n_train: int, seed: int = 1234) -> tuple[list, list]:
    """(train, dev) from one split's examples: dev holds n_dev distinct prompts (one example each, with all
    of that prompt's references), train n_train examples whose prompts are not in dev."""
    pool = list(examples)
    random.Random(seed).shuffle(pool)
    key = lambda e: json.dumps(e.prompt, sort_keys=True, default=str)  # noqa: E731
    dev, held = [], set()
    for e in pool:
        if len(dev) == n_dev:
            break
        if key(e) not in held:
            held.add(key(e))
            dev.append(e)
    rest = [e for e in pool if key(e) not in held]
    return rest[:n_train], dev


def train_and_score(base, tokenizer, task, train_examples, scored, seed, size, out: Path, **train_args) -> tuple:
    """Train one adapter into ``out`` on a deep copy of the backbone and score ``scored`` with the task's metric
    -> (training summary, scores, per-item predictions)."""
    model = copy.deepcopy(base)
    result = train(
        model=model,
        tokenizer=tokenizer,
        examples=train_examples,
        output_dir=str(out),
        seed=seed,
        max_length=size.max_length,
        overflow=size.overflow,
        progress=False,
        **train_args,
    )
    predictions_path = out / "predictions.jsonl"
    scores = evaluate(
        model, tokenizer, task, examples=scored, batch_size=16, progress=False, predictions_path=predictions_path
    )
    predictions = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    return result.summary, scores, predictions


def run_dev(base, tokenizer, task, train_examples, dev_examples, settings, seed, size, work) -> dict[str, Any]:
    """Train one variant for DEV_EPOCHS with the dev split evaluated every epoch; score the kept (best) epoch
    on the dev split with the task's own metric."""
    summary, scores, _ = train_and_score(
        base,
        tokenizer,
        task,
        train_examples,
        dev_examples,
        seed,
        size,
        Path(tempfile.mkdtemp(dir=work)),
        eval_examples=dev_examples,
        epochs=DEV_EPOCHS,
        batch_size=8,
        scheduler="cosine",
        warmup=0.06,
        logging_steps=10,
        **settings,
    )
    return {
        "trainable": summary["trainable_parameters"],
        "train_seconds": summary["train_seconds"],
        "train_loss": summary["train_loss"],
        "steps": summary["steps"],
        "best": summary["best"],
        "curve": [
            {k: r[k] for k in ("epoch", "step", "eval_loss", "eval_accuracy", "eval_macro_f1") if k in r}
            for r in summary["evaluations"]
        ],
        **{f"dev_{k}": v for k, v in scores.items() if k not in ("task", "split")},
    }


def dev_phase(args: argparse.Namespace, out: Path) -> None:
    runs_path = out / "quality_dev_runs.jsonl"
    done = {(r["task"], r["variant"], r["seed"]): r for r in _records(runs_path)}
    start = time.perf_counter()
    base, tokenizer = load_base()
    work = Path(tempfile.mkdtemp(prefix="pedro-quality-dev-"))
    variants = [v for v in DEV_VARIANTS if not args.variants or v in args.variants.split(";")]
    for task_name in args.tasks.split(","):
        size = DEV_SIZES[task_name]
        task = get_task(task_name, args.data_dir)
        if task_name in GEN_TOKENS:
            task.max_new_tokens = GEN_TOKENS[task_name]
        train_part, dev_part = dev_split(task.load("train"), size.eval, size.train)
        for seed in [int(x) for x in args.seeds.split(",")]:
            for variant in variants:
                if (task_name, variant, seed) in done:
                    continue
                if DEV_VARIANTS[variant].get("objective") == "choice" and task.kind != "choice":
                    continue
                record = run_dev(base, tokenizer, task, train_part, dev_part, DEV_VARIANTS[variant], seed, size, work)
                record = {
                    "task": task_name,
                    "variant": variant,
                    "seed": seed,
                    "n_train": len(train_part),
                    "n_dev": len(dev_part),
                    **record,
                }
                done[(task_name, variant, seed)] = record
                append(runs_path, record)
                metric = f"dev_{task.metric}"
                print(
                    f"[{(time.perf_counter() - start) / 60:5.1f} min] {task_name} {variant} seed {seed}: "
                    f"{metric} {record[metric]:.3f}, best {record['best']}",
                    flush=True,
                )
                dev_report(_records(runs_path), out)  # the file: other processes may run other tasks
    dev_report(_records(runs_path), out)


def dev_report(records: list[dict[str, Any]], out: Path) -> None:
    """results/quality_dev.{json,md}: each variant's dev curve (every epoch) and its kept epoch's score."""
    write_json_atomic(
        out / "quality_dev.json",
        {
            "sizes": {k: vars(v) for k, v in DEV_SIZES.items()},
            "epochs": DEV_EPOCHS,
            "variants": DEV_VARIANTS,
            "runs": records,
        },
    )
    lines = [
        "# Quality study, dev phase: the choices behind `pedro train`'s defaults",
        "",
        "Command: `python benchmarks/quality.py --phase dev`",
        "",
        f"Each variant trains {DEV_EPOCHS} epochs (cosine schedule, batch 8) on records of the task's *train* split and is "
        "scored on a dev split carved from the same split (records sharing an input kept on one side), at every "
        "epoch; the adapter kept is the best epoch's (accuracy for choice tasks, loss otherwise), scored again on "
        "the dev split with the task's metric. The test splits are not read. One seed (0) per variant.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in records):
        runs = [r for r in records if r["task"] == task]
        metric = get_task(task).metric
        key = "eval_accuracy" if "eval_accuracy" in runs[0]["curve"][0] else "eval_loss"
        epochs = max(len({c["step"] for c in r["curve"]}) for r in runs)
        lines += [
            f"## {task} ({runs[0]['n_train']} train / {runs[0]['n_dev']} dev records)",
            "",
            f"| variant | trainable | {key.removeprefix('eval_')} by epoch "
            + " ".join(f"| {e + 1}" for e in range(epochs))
            + f" | best epoch | dev {metric} of the kept epoch |",
            "|---|---:|---" + "|---:" * epochs + "|---:|---:|",
        ]
        for r in runs:
            r["curve"] = list({c["step"]: c for c in reversed(r["curve"])}.values())[::-1]  # one entry per step
            scale = 100.0 if key == "eval_accuracy" else 1.0
            curve = " | ".join(
                f"{scale * c[key]:.1f}" if key == "eval_accuracy" else f"{c[key]:.3f}" for c in r["curve"]
            )
            best_epoch = next((round(c["epoch"]) for c in r["curve"] if c["step"] == r["best"]["step"]), "?")
            value = r[f"dev_{metric}"] * (100.0 if metric in ("accuracy", "exact_match") else 1.0)
            lines.append(f"| {r['variant']} | {r['trainable']:,} | | {curve} | {best_epoch} | {value:.1f} |")
        lines.append("")
    tmp = out / ".quality_dev.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "quality_dev.md")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def per_item(task: Any, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """What the paired bootstrap needs from one run: correctness per item (choice) or the texts (generation)."""
    if task.kind == "choice":
        return {"correct": "".join("1" if p["correct"] else "0" for p in predictions)}
    return {"predictions": [p["prediction"] for p in predictions]}


def run_one(base, tokenizer, task, train_examples, eval_examples, settings, seed, size, out: Path) -> dict[str, Any]:
    """Train one adapter with `pedro train`'s defaults on a deep copy of the backbone, score the test items.
    Training resumes from the last checkpoint in ``out`` (one per epoch and every SAVE_STEPS steps), so a run
    longer than a process's life still finishes; its train time counts every piece up to the checkpoint it
    resumed from."""
    summary, scores, predictions = train_and_score(
        base,
        tokenizer,
        task,
        train_examples,
        eval_examples,
        seed,
        size,
        out,
        resume=True,
        save_steps=SAVE_STEPS,
        dev_split=size.dev_split,
        **settings,
    )
    return {
        "trainable": summary["trainable_parameters"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"],
        "tokens_per_second": summary["tokens_per_second"],
        "precision": summary["precision"],  # bf16 autocast or fp32: decided by the CPU the run trained on
        "train_loss": summary["train_loss"],
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "lr": summary["lr"],
        "n_train": summary["data"]["kept"],
        "dev_records": summary["dev_records"],
        "best": summary["best"],
        **{k: scores[k] for k in scores if k not in ("task", "split")},
        **per_item(task, predictions),
    }


def load_done(path: Path) -> dict[tuple, dict]:
    return {(r["task"], r["method"], r["seed"]): r for r in _records(path)}


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where it cannot be read: with the pid it
    names one process, so a claim is not mistaken as held by an unrelated process that reuses a dead one's pid
    (pids restart from low numbers on every boot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22; the name before ")" may hold spaces


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return not started or _started(pid) in ("", started)


def claim(folder: Path, key: tuple) -> bool:
    """Lets several study processes share one results folder, each training the runs it claims first. A claim
    whose process has died is taken over, so a killed study resumes where it stopped. A claim holds the
    process's pid and start time."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "-".join(map(str, key))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text, age = path.read_text().split(), time.time() - path.stat().st_mtime
            except OSError:
                continue
            pid, started = (text + ["", ""])[:2]  # a claim written before start times: its pid alone
            if (pid.isdigit() and _alive(int(pid), started)) or (not text and age < 60):  # empty: being written
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {_started(os.getpid())}".strip())
        return True
    return False


def release(folder: Path, key: tuple) -> None:
    (folder / "-".join(map(str, key))).unlink(missing_ok=True)


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


SECONDARY = {"e2e": ["rougeL"], "trec": ["macro_f1"], "conala": ["exact_match"]}  # reported next to the metric
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95 % t quantiles by number of seeds


def _scorer(task: Any, examples: list, run: dict[str, Any]) -> Callable[[list[int]], float]:
    """The task's headline metric of one run on a resample of the test items (item indices). Accuracy and a
    corpus metric with per-item statistics (BLEU: pedro.tasks.bleu) add up rows computed once; any other
    metric re-scores the resample."""
    if "correct" in run:
        correct = [c == "1" for c in run["correct"]]
        return lambda items: sum(correct[i] for i in items) / len(items)
    rows = task.item_statistics(run["predictions"], examples)
    if rows is not None:
        return lambda items: task.metric_from([sum(column) for column in zip(*(rows[i] for i in items))])
    return lambda items: task.score([run["predictions"][i] for i in items], [examples[i] for i in items])[task.metric]


def paired_bootstrap(
    task: Any, examples: list, a: list[dict], b: list[dict], rounds: int, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of mean-over-seeds(metric of a) minus mean-over-seeds(metric of b), resampling test items
    (the same resample for every run, so the comparison is paired)."""
    rng = random.Random(seed)
    diffs = []
    n_items = len(examples)
    score_a = [_scorer(task, examples, r) for r in a]
    score_b = [_scorer(task, examples, r) for r in b]
    for _ in range(rounds):
        items = [rng.randrange(n_items) for _ in range(n_items)]
        diffs.append(statistics.mean(f(items) for f in score_a) - statistics.mean(f(items) for f in score_b))
    diffs.sort()
    return diffs[int(0.025 * rounds)], diffs[min(rounds - 1, int(0.975 * rounds))]


def aggregate(records: list[dict[str, Any]], tasks: dict[str, tuple[Any, list]], rounds: int) -> dict[str, Any]:
    """Per task and method: mean, std and a 95 % t-interval over seeds; PEDRO minus each baseline with a paired
    bootstrap interval over test items."""
    table: dict[str, dict[str, Any]] = {}
    for name, (task, examples) in tasks.items():
        metric = task.metric
        info: dict[str, Any] = {"metric": metric, "methods": {}, "versus": {}}
        for method in ["zero_shot", *METHODS]:
            runs = sorted((r for r in records if r["task"] == name and r["method"] == method), key=lambda r: r["seed"])
            if not runs:
                continue
            info["n_eval"] = runs[0]["n"]
            entry: dict[str, Any] = {
                "seeds": [r["seed"] for r in runs],
                "trainable": runs[0].get("trainable", 0),
                "n_train": runs[0].get("n_train"),
                "dev_records": runs[0].get("dev_records"),
                "epochs": runs[0].get("epochs"),
                "lr": runs[0].get("lr"),
                # each run's wall and CPU time (pauses do not advance the latter), where the run recorded it
                **{
                    key: [r[key] for r in runs if r.get(key) is not None]
                    for key in ("train_seconds", "train_cpu_seconds")
                },
            }
            for key in [metric, *SECONDARY.get(name, [])]:
                values = [r[key] for r in runs]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                half = T95.get(len(values), 2.0) * std / math.sqrt(len(values)) if len(values) > 1 else None
                entry[key] = {"mean": statistics.mean(values), "std": std, "ci95": half, "values": values}
            info["methods"][method] = entry
        for ours, other in PAIRS:
            pedro_runs = [r for r in records if r["task"] == name and r["method"] == ours]
            other_runs = [r for r in records if r["task"] == name and r["method"] == other]
            seeds = sorted({r["seed"] for r in pedro_runs} & {r["seed"] for r in other_runs})
            if not seeds:
                continue
            a = [r for r in pedro_runs if r["seed"] in seeds]
            b = [r for r in other_runs if r["seed"] in seeds]
            low, high = paired_bootstrap(task, examples, a, b, rounds)
            info["versus"][f"{ours} - {other}"] = {
                "seeds": seeds,
                "difference": statistics.mean(r[metric] for r in a) - statistics.mean(r[metric] for r in b),
                "bootstrap95": [low, high],
            }
        table[name] = info
    return table


def standing(table: dict[str, Any], pair: str) -> dict[str, list[str]]:
    """Where PEDRO stands against a baseline on each task that has the pair, read off the paired interval:
    "above" (the interval of PEDRO minus the baseline is above 0), "below" (under 0), or "level" (it holds 0).
    The study's criterion, PEDRO at or above the baseline within the spread, counts "above" and "level"."""
    tasks: dict[str, list[str]] = {"above": [], "level": [], "below": []}
    for task, info in table.items():
        versus = info["versus"].get(pair)
        if versus is None:
            continue
        low, high = versus["bootstrap95"]
        tasks["above" if low > 0 else "below" if high < 0 else "level"].append(task)
    return tasks


def _scale(metric: str) -> float:
    return 100.0 if metric in ("accuracy", "exact_match", "macro_f1") else 1.0


def _shown(table: dict[str, Any]) -> list[str]:
    """The methods with at least one run on record, in METHODS' order."""
    return [m for m in METHODS if any(m in info["methods"] for info in table.values())]


def _pairs(table: dict[str, Any]) -> list[str]:
    """The PAIRS with a comparison on record for some task, as "ours - baseline"."""
    return [f"{a} - {b}" for a, b in PAIRS if any(f"{a} - {b}" in info["versus"] for info in table.values())]


def _minutes(seconds: list[float], runs: int) -> str:
    """The mean over the runs that recorded a time, saying how many did where some did not."""
    if not seconds:
        return "?"
    some = f", {len(seconds)} of {runs} runs" if len(seconds) < runs else ""
    return f"{statistics.mean(seconds) / 60:.0f} min{some}"


def markdown(table: dict[str, Any], meta: dict[str, Any]) -> str:
    methods = _shown(table)
    pairs = _pairs(table)
    lines = [
        "# Quality study: PEDRO vs parameter-matched LoRA and (IA)3 (SmolLM2-135M, CPU)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone: smollm2-135m (SmolLM2-135M-Instruct); training precision {meta['precision']}, as each run's CPU "
        f"allowed (bf16 autocast where it has native bf16); seeds {meta['seeds']}; every method trained "
        "by `pedro train` with its defaults (epochs sized to the data, a dev split of the training records choosing "
        f"the best epoch, the method's default learning rate: {meta['default_lr']}); {meta['runs']} runs, "
        f"{meta['run_minutes']:.0f} min of training and scoring; torch threads {meta['threads']}.",
        "",
        "Test splits only here; every choice was made on dev splits of the training data (results/quality_dev.md). "
        "Metrics: SST-2, RTE accuracy and TREC accuracy (macro-F1) by log-likelihood ranking of the label words; "
        "E2E corpus BLEU (ROUGE-L), multi-reference; CoNaLa corpus BLEU over CoNaLa's code tokens (exact match); "
        "greedy decoding. Cells: mean ± std over seeds [95 % t-interval of the mean]; accuracy and exact match in %.",
        "",
        "| task (metric; n train / dev / test) | zero-shot | " + " | ".join(methods) + " |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for task, info in table.items():
        scale = _scale(info["metric"])
        cells = []
        for method in ["zero_shot", *methods]:
            entry = info["methods"].get(method)
            if entry is None:
                cells.append("—")
                continue
            m = entry[info["metric"]]
            cell = f"{scale * m['mean']:.1f}"
            if method != "zero_shot" and m["ci95"] is not None:
                cell += f" ± {scale * m['std']:.1f} [±{scale * m['ci95']:.1f}]"
            if method != "zero_shot":
                cell += f" (n={len(m['values'])})"
            for key in SECONDARY.get(task, []):
                cell += f"; {key} {_scale(key) * entry[key]['mean'] if key != 'rougeL' else entry[key]['mean']:.1f}"
            cells.append(cell)
        trained = next((e for m, e in info["methods"].items() if m != "zero_shot"), {})
        sizes = f"{trained.get('n_train', '?')} / {trained.get('dev_records', '?')} / {info.get('n_eval', '?')}"
        lines.append(f"| {task} ({info['metric']}; {sizes}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"PEDRO minus each baseline, same seeds; 95 % paired bootstrap interval over test items ({meta['rounds']} "
        "resamples, each run re-scored on the same resample):",
        "",
        "| task | " + " | ".join(pair.replace(" - ", " − ") for pair in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for task, info in table.items():
        scale = _scale(info["metric"])
        cells = []
        for pair in pairs:
            v = info["versus"].get(pair)
            cells.append(
                f"{scale * v['difference']:+.1f} [{scale * v['bootstrap95'][0]:+.1f}, {scale * v['bootstrap95'][1]:+.1f}] "
                f"(seeds {','.join(map(str, v['seeds']))})"
                if v
                else "—"
            )
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("")
    for pair in pairs:
        where = standing(table, pair)
        compared = sum(len(tasks) for tasks in where.values())
        label = {
            task: f"{task} ({n} seed{'s' if n > 1 else ''})"
            for task, info in table.items()
            if pair in info["versus"] and (n := len(info["versus"][pair]["seeds"]))
        }
        named = "; ".join(
            f"{kind}: {', '.join(label[task] for task in tasks)}" for kind, tasks in where.items() if tasks
        )
        lines.append(
            f"{pair.replace(' - ', ' against ')}: at or above within the interval on "
            f"{len(where['above']) + len(where['level'])} of {compared} tasks ({named})."
        )
    lines += [
        "",
        "Trainable parameters, epochs, learning rate and mean train time per run: wall time (it includes the "
        "time a run was paused for other jobs on the machine), and CPU time where the run recorded it:",
        "",
        "| task | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for task, info in table.items():
        cells = [
            f"{e['trainable']:,}; {e['epochs']:g} ep; lr {e['lr']:g}; {_minutes(e['train_seconds'], len(e['seeds']))}"
            + (f" (CPU {_minutes(cpu, len(e['seeds']))})" if (cpu := e["train_cpu_seconds"]) else "")
            if (e := info["methods"].get(m))
            else "—"
            for m in methods
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Top: each task's metric per method (mean over seeds; a 95 % t-interval where there are 2+ seeds). Bottom:
    PEDRO minus each baseline per task with its paired bootstrap interval, the comparison the study is about."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["zero_shot", *_shown(table)]
    palette = ["#999999", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]
    color = dict(zip(["zero_shot", *METHODS], palette))
    fig = plt.figure(figsize=(3.4 * len(table), 7.4))
    grid = fig.add_gridspec(2, len(table), height_ratios=[1.0, 0.9])
    for i, (task, info) in enumerate(table.items()):
        ax = fig.add_subplot(grid[0, i])
        scale = _scale(info["metric"])
        entries = [info["methods"].get(m) for m in methods]
        means = [scale * e[info["metric"]]["mean"] if e else 0.0 for e in entries]
        # no bar (not even a cap) where one seed gives no interval
        errs = [scale * ci if e and (ci := e[info["metric"]]["ci95"]) is not None else math.nan for e in entries]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=3, color=[color[m] for m in methods])
        for x, (m, e) in enumerate(zip(methods, entries)):
            if e and m != "zero_shot":
                ax.annotate(
                    f"n={len(e['seeds'])}",
                    (x, 0),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    color="white",
                )
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task} ({info['metric']})")
    pairs = _pairs(table)
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / max(1, len(pairs))
    for j, pair in enumerate(pairs):
        xs, ys, low, high = [], [], [], []
        for i, info in enumerate(table.values()):
            v = info["versus"].get(pair)
            if v is None:
                continue
            scale = _scale(info["metric"])
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(scale * v["difference"])
            low.append(scale * (v["difference"] - v["bootstrap95"][0]))
            high.append(scale * (v["bootstrap95"][1] - v["difference"]))
        ax.errorbar(
            xs,
            ys,
            yerr=[low, high],
            fmt="o",
            capsize=3,
            label=pair.replace(" - ", " − "),
            color=palette[2 + j],
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), [f"{t} ({i['metric']})" for t, i in table.items()])
    ax.set_xlim(-0.5, len(table) - 0.5)
    ax.set_ylabel("PEDRO minus baseline (points)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("PEDRO minus each baseline, same seeds: 95 % paired bootstrap interval over test items")
    fig.suptitle("SmolLM2-135M, test splits: mean over seeds (n seeds), 95 % t-interval where n ≥ 2")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def load_task(task_name: str, size: Size, data_dir: str | None) -> tuple[Any, list, list]:
    """The task, its training records (a fixed shuffle of the train split) and its scored test items."""
    task = get_task(task_name, data_dir)
    if task_name in GEN_TOKENS:
        task.max_new_tokens = GEN_TOKENS[task_name]
    pool = task.load("train")
    random.Random(0).shuffle(pool)
    return task, pool[: size.train], task.load("test", size.eval)


def test_phase(args: argparse.Namespace, out: Path, command: str) -> None:
    all_sizes = QUICK if args.quick else SIZES
    sizes = {t: all_sizes[t] for t in args.tasks.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    stem = "quality_quick" if args.quick else "quality"
    runs_path = out / f"{stem}_runs.jsonl"
    claims = out / f".{stem}_claims"
    runs_dir = out / f".{stem}_work"  # each run's checkpoints, kept across processes until it is on record

    def run_folder(key: tuple) -> Path:
        return runs_dir / "-".join(map(str, key))

    done = load_done(runs_path)
    start = time.perf_counter()
    tasks: dict[str, Any] = {}
    # the training processes' threads: a --report process trains nothing, so it keeps what they wrote
    previous = out / f"{stem}.json"
    threads = (
        (json.loads(previous.read_text())["meta"]["threads"] if previous.is_file() else "?")
        if args.report
        else torch.get_num_threads()
    )

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {message}", flush=True)

    def write_outputs() -> None:
        # Other study processes may share the folder: the report covers every run on record, not just ours.
        done.update(load_done(runs_path))
        records = list(done.values())
        for name in sorted({r["task"] for r in records} - set(tasks)):
            if name in all_sizes:
                task, _, items = load_task(name, all_sizes[name], args.data_dir)
                tasks[name] = (task, items)
        ordered = {name: tasks[name] for name in all_sizes if name in tasks}  # one order, whichever process writes
        table = aggregate([r for r in records if r["task"] in tasks], ordered, 20 if args.quick else BOOTSTRAP)
        meta = {
            "command": command,
            "precision": ", ".join(
                f"{p} ({n} runs)"
                for p, n in sorted(Counter(r["precision"] for r in records if r["method"] != "zero_shot").items())
            ),
            "seeds": ",".join(map(str, sorted({r["seed"] for r in records if r["method"] != "zero_shot"}))),
            "default_lr": DEFAULT_LR,
            "runs": len(records),
            "run_minutes": sum((r.get("train_seconds") or 0.0) + r.get("seconds", 0.0) for r in records) / 60,
            "threads": threads,
            "rounds": 20 if args.quick else BOOTSTRAP,
            "sizes": {k: vars(all_sizes[k]) for k in all_sizes if k in tasks},  # one order, whichever process writes
            "methods": METHODS,
            "gen_tokens": GEN_TOKENS,
        }
        write_json_atomic(out / f"{stem}.json", {"meta": meta, "table": table})
        tmp = out / f".{stem}.md.tmp"
        tmp.write_text(markdown(table, meta))
        tmp.replace(out / f"{stem}.md")
        plot(table, out / f"{stem}.png")

    def run_claimed(key: tuple, make: Any) -> bool:
        """Run `make` for `key` unless it is on record or another process holds it; False if skipped."""
        done.update(load_done(runs_path))
        if key in done:
            return True
        if not claim(claims, key):
            log(f"{' '.join(map(str, key))}: another study process is running it")
            return False
        try:
            done[key] = make()
            append(runs_path, done[key])
            shutil.rmtree(run_folder(key), ignore_errors=True)
        finally:
            release(claims, key)
        return True

    if args.report:
        if not done:
            raise SystemExit(f"no runs on record in {runs_path}: nothing to report (run the study first)")
        write_outputs()
        log(f"rebuilt from {len(done)} runs on record: {out / stem}.md")
        return
    base, tokenizer = load_base()
    work = Path(tempfile.mkdtemp(prefix="pedro-quality-"))
    for task_name, size in sizes.items():
        task, train_examples, eval_examples = load_task(task_name, size, args.data_dir)
        tasks[task_name] = (task, eval_examples)

        def zero_shot() -> dict[str, Any]:
            out_dir = Path(tempfile.mkdtemp(dir=work))
            scores = evaluate(
                base,
                tokenizer,
                task,
                examples=eval_examples,
                batch_size=16,
                progress=False,
                predictions_path=out_dir / "p.jsonl",
            )
            predictions = [json.loads(line) for line in (out_dir / "p.jsonl").read_text().splitlines()]
            return {
                "task": task_name,
                "method": "zero_shot",
                "seed": 0,
                "trainable": 0,
                **{k: v for k, v in scores.items() if k not in ("task", "split")},
                **per_item(task, predictions),
            }

        key = (task_name, "zero_shot", 0)
        if run_claimed(key, zero_shot):
            log(f"{task_name} zero-shot: {done[key][task.metric]:.3f}")
        for seed in seeds:
            for method in methods:
                settings = METHODS[method]
                key = (task_name, method, seed)

                def trained(
                    method: str = method, settings: dict = settings, seed: int = seed, key: tuple = key
                ) -> dict[str, Any]:
                    folder = run_folder(key)
                    record = run_one(base, tokenizer, task, train_examples, eval_examples, settings, seed, size, folder)
                    return {"task": task_name, "method": method, "seed": seed, **record}

                if not run_claimed(key, trained):
                    continue
                r = done[key]
                log(
                    f"{task_name} {method} seed {seed}: {task.metric} {r[task.metric]:.3f} "
                    f"({r['trainable']:,} params, {r['epochs']:g} epochs, {(r['train_seconds'] or 0) / 60:.1f} min train)"
                )
                write_outputs()
    write_outputs()
    log(f"done: {out / stem}.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--phase",
        default="test",
        choices=("dev", "test"),
        help="dev: the choices, on dev splits carved from train; test: the study on the test splits",
    )
    parser.add_argument("--tasks", default=None, help="default: sst2,rte,trec,e2e,conala (test), trec,e2e (dev)")
    parser.add_argument("--seeds", default=None, help="default: 0,1,2 (test), 0 (dev)")
    parser.add_argument(
        "--methods", default=",".join(CORE), help=f"test phase, from {', '.join(METHODS)} (default: %(default)s)"
    )
    parser.add_argument("--variants", default="", help="dev phase: ';'-separated variant names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the study's code path in minutes")
    parser.add_argument(
        "--report",
        action="store_true",
        help="test phase: rebuild the tables and plot from the runs on record, train nothing",
    )
    # absolute, as a path under the checkout was: from the repository's root a study resumes from the same
    # folder, and its runs' checkpoint paths are the same strings
    parser.add_argument(
        "--out",
        default=str(Path.cwd() / "results"),
        help="folder for the results (default: results in the current directory)",
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    # the report names the study's command, not the one of whichever of the processes sharing the folder wrote it
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "dev":
        args.tasks, args.seeds = args.tasks or "trec,e2e", args.seeds or "0"
        dev_phase(args, out)
    else:
        args.tasks, args.seeds = args.tasks or "sst2,rte,trec,e2e,conala", args.seeds or "0,1,2"
        test_phase(args, out, command)


if __name__ == "__main__":
    main()
