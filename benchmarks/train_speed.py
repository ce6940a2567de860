"""Training throughput: PEDRO and parameter-matched LoRA, fp32 and bf16, measured side by side.

    python benchmarks/train_speed.py              # = pedro bench train; writes results/train_speed.{json,md}
    python benchmarks/train_speed.py --quick      # one repeat of a few steps: checks the code path
                                                  #   -> results/train_speed-quick.{json,md}
    python benchmarks/train_speed.py --profile "fp32 before,bf16"   # torch.profiler tables of one PEDRO step

Every run is a real ``pedro.train`` call (Trainer, collator, sampler, optimizer) on a fresh copy of the
backbone, with a fixed number of steps on the same records; tokens/s counts non-padding tokens from the end of
the warm-up steps to the end of the run (data loading and optimizer steps included), per second of wall time
and per second of this process's CPU time. On a machine shared with other jobs the wall time includes the time
spent waiting for a core, which moved single runs by 3x here; the CPU time (one torch thread, so no spinning
threads inflate it) is what the ratios are taken from. The configurations:

- ``fp32 before``: the previous defaults (fp32, random batches, logits at every position, the backbone's
  attention), the reference for the speed-ups;
- ``fp32``: exact fp32, with length-grouped batches and logits only where the loss reads them;
- ``bf16 autocast``: bf16 autocast over an fp32 backbone (what a model passed to ``train()`` in fp32 gets);
- ``bf16``: a bf16 backbone under bf16 autocast, fp32 adapter weights (``pedro train``'s default on a CPU with
  native bf16);
- ``bf16 sdpa`` (only when asked for, e.g. with ``--profile``): ``bf16`` with PyTorch's fused attention.

Each is run for PEDRO and for LoRA sized to PEDRO's parameter count. The machine this was written on is shared
with other jobs, so the runs are interleaved (every repeat runs every configuration once, in a rotated order)
and the report gives medians over repeats and, more robustly, ratios between configurations taken within each
repeat (paired), then their median.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import default_out  # noqa: E402

import pedro  # noqa: E402
from pedro.data import load_records, write_json_atomic  # noqa: E402
from pedro.train import resolve_precision, train  # noqa: E402

BEFORE = dict(precision="fp32", group_by_length=False, response_logits_only=False, attention="sdpa")
MODES: dict[str, dict[str, Any]] = {
    "fp32 before": dict(BEFORE, backbone="float32"),
    "fp32": dict(precision="fp32", backbone="float32"),
    "bf16 autocast": dict(precision="bf16", backbone="float32"),
    "bf16": dict(precision="bf16", backbone="bfloat16"),
    # not in the default run: bf16 with PyTorch's fused attention, to see what eager attention saves
    "bf16 sdpa": dict(precision="bf16", backbone="bfloat16", attention="sdpa"),
}
DEFAULT_MODES = ("fp32 before", "fp32", "bf16 autocast", "bf16")
METHODS: dict[str, dict[str, Any]] = {
    "pedro": dict(method="pedro", r=8),
    "lora": dict(method="lora", match_params="pedro", lora_targets=("q", "v")),
}


class StepClock(TrainerCallback):
    """Wall time, CPU time and non-padding tokens from the end of step ``warmup`` to the end of the run."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, int, float] | None = None
        self.end: tuple[float, int, float] | None = None
        self.step_seconds: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now
        mark = (now, state.num_input_tokens_seen, time.process_time())
        if state.global_step == self.warmup:
            self.start = mark
        self.end = mark

    def tokens_per_second(self, clock: int = 0) -> float:
        """Per second of wall time (``clock=0``) or of this process's CPU time (``clock=2``)."""
        if self.start is None or self.end is None or self.end[clock] <= self.start[clock]:
            raise RuntimeError("the run ended before its measured steps")
        return (self.end[1] - self.start[1]) / (self.end[clock] - self.start[clock])


def _train(
    backbones, tokenizer, examples, method: str, mode: str, opts: argparse.Namespace, steps: int, callbacks: list
):
    """``steps`` training steps of ``method`` in ``mode`` on a copy of its backbone -> (the copy, the result)."""
    settings = {**METHODS[method], **MODES[mode]}
    model = copy.deepcopy(backbones[settings.pop("backbone")])
    with tempfile.TemporaryDirectory(prefix="train-speed-") as out:
        result = train(
            model=model,
            tokenizer=tokenizer,
            examples=examples,
            output_dir=out,
            progress=False,
            max_steps=steps,
            batch_size=opts.batch_size,
            max_length=opts.max_length,
            lr=1e-3,
            warmup=0,
            logging_steps=10_000,
            seed=0,
            threads=opts.threads,
            callbacks=callbacks,
            **settings,
        )
    return model, result


def run_one(backbones, tokenizer, examples, method: str, mode: str, opts: argparse.Namespace) -> dict[str, Any]:
    clock = StepClock(opts.warmup)
    model, result = _train(backbones, tokenizer, examples, method, mode, opts, opts.warmup + opts.steps, [clock])
    del model
    summary = result.summary
    return {
        "method": method,
        "mode": mode,
        "tokens_per_s": clock.tokens_per_second(),
        "tokens_per_cpu_s": clock.tokens_per_second(clock=2),
        "measured_tokens": clock.end[1] - clock.start[1],
        "seconds": clock.end[0] - clock.start[0],
        "cpu_seconds": clock.end[2] - clock.start[2],
        "step_seconds": [round(s, 3) for s in clock.step_seconds],
        "train_loss": summary["train_loss"],
        "precision": summary["precision"],
        "backbone_dtype": summary["backbone_dtype"],
        "attention": summary["attention"],
        "trainable_parameters": summary["trainable_parameters"],
    }


class ProfileStep(TrainerCallback):
    """torch.profiler over one training step (the one after the warm-up), with PEDRO's forward pieces labelled."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.profiler is not None and state.global_step == self.step + 1:
            self.profiler.__exit__(None, None, None)


def _labelled(module, name: str, label: str) -> None:
    """Wrap ``module.name`` so that its calls show up as ``label`` in the profile."""
    from torch.profiler import record_function

    inner = getattr(module, name)
    if getattr(inner, "labelled", False):
        return

    def wrapped(*args, **kwargs):
        with record_function(label):
            return inner(*args, **kwargs)

    wrapped.labelled = True
    setattr(module, name, wrapped)


def profile_step(backbones, tokenizer, examples, mode: str, opts: argparse.Namespace, method: str = "pedro") -> None:
    """Print where one training step's time goes: the top operators (by input shape), by category, and PEDRO's
    own forward pieces (generator, prompt mask, scales) against the whole step."""
    import pedro.generator
    import pedro.layer
    import pedro.model

    _labelled(pedro.generator.VectorGenerator, "forward", "pedro: generator (pool + Down/act/Up)")
    _labelled(pedro.layer, "apply_scale", "pedro: scale out + out*z")
    _labelled(pedro.model, "build_prompt_mask", "pedro: prompt mask")
    clock = StepClock(opts.warmup)
    probe = ProfileStep(opts.warmup)
    model, _ = _train(backbones, tokenizer, examples, method, mode, opts, opts.warmup + 1, [clock, probe])
    events = probe.profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(
        f"\n=== one {method} training step, {mode}: {total / 1e6:.2f} s of operator time "
        f"(step wall time {clock.step_seconds[-1]:.2f} s)"
    )
    by_shape = probe.profiler.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=20))
    vocab = model.config.vocab_size
    sums: dict[str, float] = {}
    for event in by_shape:
        shapes = [dim for shape in (event.input_shapes or []) if isinstance(shape, (list, tuple)) for dim in shape]
        if vocab in shapes:
            kind = "LM head + loss (ops on vocab-wide tensors)"
        elif event.key in ("aten::mm", "aten::addmm"):
            kind = "projection GEMMs"
        elif "scaled_dot_product" in event.key or event.key in (
            "aten::bmm",
            "aten::_softmax",
            "aten::_softmax_backward_data",
        ):
            kind = "attention (sdpa, or eager bmm + softmax)"
        else:
            kind = "everything else (norms, RoPE, SiLU, adds, casts, PEDRO scales, optimizer)"
        sums[kind] = sums.get(kind, 0.0) + event.self_cpu_time_total
    for kind, value in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"{kind:75s} {value / 1e3:8.1f} ms ({100 * value / total:4.1f} %)")
    for event in events:
        if event.key.startswith("pedro:") or "Scale" in event.key or event.key.endswith("AddcmulBackward0"):
            print(
                f"{event.key:45s} {event.cpu_time_total / 1e3:8.1f} ms ({100 * event.cpu_time_total / total:4.1f} %)"
                f" in {event.count} calls"
            )


def paired_ratios(
    runs: list[dict[str, Any]], pairs: list[tuple[tuple[str, str], tuple[str, str]]], key: str = "tokens_per_cpu_s"
) -> dict[str, Any]:
    """For each (numerator, denominator) configuration pair, the ratio of ``key`` within each repeat."""
    out = {}
    for (m1, d1), (m2, d2) in pairs:
        values = []
        for rep in sorted({r["repeat"] for r in runs}):
            a = [r for r in runs if r["repeat"] == rep and (r["method"], r["mode"]) == (m1, d1)]
            b = [r for r in runs if r["repeat"] == rep and (r["method"], r["mode"]) == (m2, d2)]
            if a and b:
                values.append(a[0][key] / b[0][key])
        if values:
            out[f"{m1} {d1} / {m2} {d2}"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "per_repeat": [round(v, 3) for v in values],
            }
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    opts = report["options"]
    lines = [
        "# Training throughput: PEDRO vs parameter-matched LoRA, fp32 vs bf16",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['backbone']} on {report['cpu']} ({report['cpu_count']} cores), torch {report['torch']}, "
        f"{opts['threads']} torch thread(s); batch {opts['batch_size']}, {opts['warmup']} warm-up + "
        f"{opts['steps']} measured steps per run, {opts['repeats']} interleaved repeat(s), {report['minutes']:.0f} min. "
        f"Load average {report['load_before']} before, {report['load_after']} after (the machine is shared: "
        "absolute numbers move with its load, the paired ratios much less). `auto` precision resolves to "
        f"**{report['auto_precision']}** here.",
        "",
        "Tokens/s are non-padding tokens over the measured steps, per second of this process's CPU time "
        "(the measure the ratios use: on this shared machine the wall time also counts the waits for a core) "
        "and, in brackets, per second of wall time; medians over repeats. Ratios are paired: taken within each "
        "repeat, then the median (min..max).",
        "",
    ]
    for task, block in report["tasks"].items():
        lines += [
            f"## {task} ({block['records']} records, {block['tokens']:,} tokens, longest {block['longest']})",
            "",
            "| configuration | PEDRO tokens/s (wall) | LoRA tokens/s (wall) | PEDRO / LoRA | PEDRO / PEDRO fp32 before "
            "| LoRA / LoRA fp32 before |",
            "|---|---:|---:|---:|---:|---:|",
        ]

        def ratio(name: str) -> str:
            value = block["ratios"].get(name)
            return "1" if value is None else f"**{value['median']:.2f}** ({value['min']:.2f}..{value['max']:.2f})"

        for mode in [m for m in MODES if f"pedro {m}" in block["median_tokens_per_s"]]:
            cpu, wall = block["median_tokens_per_cpu_s"], block["median_tokens_per_s"]
            lines.append(
                f"| {mode} | {cpu[f'pedro {mode}']:.0f} ({wall[f'pedro {mode}']:.0f}) "
                f"| {cpu[f'lora {mode}']:.0f} ({wall[f'lora {mode}']:.0f}) | {ratio(f'pedro {mode} / lora {mode}')} "
                f"| {ratio(f'pedro {mode} / pedro fp32 before')} | {ratio(f'lora {mode} / lora fp32 before')} |"
            )
        wall_ratios = block["wall_ratios"]
        lines += [
            "",
            "The same ratios on wall time (noisier): "
            + "; ".join(f"{name} {value['median']:.2f}" for name, value in wall_ratios.items())
            + ".",
            "",
        ]
    lines += [
        "Configurations: `fp32 before` = the previous defaults (fp32, random batches, logits at every position, "
        "sdpa attention); `fp32` = fp32 with length-grouped batches and logits only where the loss reads them; "
        "`bf16 autocast` = bf16 autocast over an fp32 backbone; `bf16` = bf16 backbone + bf16 autocast with fp32 "
        "adapter weights (the default of `pedro train` on a CPU with native bf16). LoRA is r="
        f"{report['lora_r']} on q,v ({report['lora_params']:,} parameters) against PEDRO r=8 "
        f"({report['pedro_params']:,}).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,rte", help="task names or JSONL files, comma-separated")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=400, help="training records per task (seeded shuffle)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the clock starts")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine a second thread waits on busy cores)",
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="subset of: " + ", ".join(MODES))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 + 2 steps, 48 records: a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="path prefix for .json/.md (default: results/train_speed in the current directory; "
        "results/train_speed-quick with --quick)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="instead of the benchmark: profile one step of each listed mode on the first task",
    )
    parser.add_argument("--profile-methods", default="pedro", help="methods --profile runs: pedro, lora or both")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.repeats, opts.warmup, opts.steps, opts.records = 1, 1, 2, 48
    modes = [m.strip() for m in (opts.profile or opts.modes).split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    args = list(argv if argv is not None else sys.argv[1:])
    command = "pedro bench train" + (" " + shlex.join(args) if args else "")
    started = time.perf_counter()
    load_before = load_average()
    base, tokenizer = pedro.load_backbone(opts.backbone, quiet=True)
    backbones = {"float32": base}
    if any(MODES[m]["backbone"] == "bfloat16" for m in modes):
        backbones["bfloat16"] = copy.deepcopy(base).to(torch.bfloat16)
    report: dict[str, Any] = {
        "command": command,
        "backbone": opts.backbone,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "auto_precision": resolve_precision("auto"),
        "options": vars(opts),
        "load_before": load_before,
        "tasks": {},
    }
    if opts.profile:
        task = opts.tasks.split(",")[0].strip()
        records = load_records(task, "train", opts.data_dir)
        random.Random(0).shuffle(records)
        for mode in modes:
            for method in opts.profile_methods.split(","):
                profile_step(backbones, tokenizer, records[: opts.records], mode, opts, method.strip())
        return {}
    configs = [(method, mode) for mode in modes for method in METHODS]
    for task in [t.strip() for t in opts.tasks.split(",") if t.strip()]:
        records = load_records(task, "train", opts.data_dir)
        random.Random(0).shuffle(records)
        records = records[: opts.records]
        runs: list[dict[str, Any]] = []
        for repeat in range(opts.repeats):
            shift = repeat % len(configs)
            for method, mode in configs[shift:] + configs[:shift]:  # rotated: no configuration always runs first
                run = run_one(backbones, tokenizer, records, method, mode, opts)
                run["repeat"] = repeat
                runs.append(run)
                print(
                    f"[{task} repeat {repeat}] {method:5s} {mode:13s} {run['tokens_per_cpu_s']:7.1f} tokens/cpu-s "
                    f"{run['tokens_per_s']:7.1f} tokens/s "
                    f"(steps {run['step_seconds']}, load {load_average()})",
                    flush=True,
                )

        def median(key: str) -> dict[str, float]:
            return {
                f"{m} {d}": statistics.median(r[key] for r in runs if (r["method"], r["mode"]) == (m, d))
                for m, d in configs
            }

        pairs = [(("pedro", d), ("lora", d)) for d in modes]
        if "fp32 before" in modes:
            pairs += [((m, d), (m, "fp32 before")) for m in METHODS for d in modes if d != "fp32 before"]
        from pedro.data import tokenize_examples

        rows, data_report = tokenize_examples(records, tokenizer, opts.max_length, "truncate")
        report["tasks"][task] = {
            "records": len(records),
            "tokens": data_report.tokens,
            "longest": max(len(r["input_ids"]) for r in rows),
            "median_tokens_per_s": median("tokens_per_s"),
            "median_tokens_per_cpu_s": median("tokens_per_cpu_s"),
            "ratios": paired_ratios(runs, pairs),
            "wall_ratios": paired_ratios(runs, pairs, "tokens_per_s"),
            "runs": runs,
        }
        first = {r["method"]: r["trainable_parameters"] for r in runs}
        report["pedro_params"], report["lora_params"] = first["pedro"], first["lora"]
    from pedro.train import TrainConfig, match_sizes

    matched, _ = match_sizes(TrainConfig(**METHODS["lora"]), base)
    report["lora_r"] = matched.lora_r
    report["load_after"] = load_average()
    report["minutes"] = (time.perf_counter() - started) / 60
    out = opts.out or default_out("train_speed", "quick" if opts.quick else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), report)
    write_markdown(out.with_suffix(".md"), report)
    print(out.with_suffix(".md").read_text())
    return report


if __name__ == "__main__":
    main()
