"""Decoding rows while a long prompt arrives: the worst inter-token gap with and without the per-step prefill
budget, side by side in one process.

``batch - 1`` rows (PEDRO adapters, one per tenant) are decoding when one long prompt arrives, bare (its
prefill split by position) or with a PEDRO adapter (split by layer ranges). Reported per case: the decoding
rows' worst gap between two consecutive tokens from the long prompt's arrival until its first token, the
median engine step time before it arrived (the rows decoding alone), and the worst gap before it arrived (how
uneven steps are without it: on a shared machine, other jobs). "off" prefills the long prompt in one step (a budget as
large as the prompt: what the engine did before it had a budget); "on N" uses a budget of N tokens
(``--budget``, one or more; default: the engine's). Cases run
interleaved, repeat by repeat, and each ratio (gap / median step) is taken within one run.

    python benchmarks/long_prompt.py                       # SmolLM2, batch 32, a 2,048-token prompt
    python benchmarks/long_prompt.py --preset smoke        # seconds: the script itself
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import pedro
from pedro.backbones import resolve_dtype
from pedro.engine import Engine, Request, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, write_report  # noqa: E402
from multitenant import make_adapters  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(batch=32, prompt_len=128, long_len=2048, warm_steps=8, after_steps=4, repeats=3),
    "smoke": dict(batch=4, prompt_len=8, long_len=48, warm_steps=2, after_steps=2, repeats=1, budget=16),
}


def run_case(
    engine: Engine,
    prompts: list[list[int]],
    adapters: list[str],
    long: list[int],
    long_adapter: str | None,
    warm_steps: int,
    after_steps: int,
) -> dict[str, float]:
    """Rows ``prompts`` decode; after ``warm_steps`` steps of all of them decoding, ``long`` arrives; the run
    ends ``after_steps`` steps after its first token. -> the worst gap (ms) from its arrival to its first token
    and before its arrival;
    the median step (ms) before its arrival (only the decoding rows: the step time the gap is compared with) and
    over the whole measured run; steps to its first token."""
    budget = 10**9  # tokens enough for every row: they all keep decoding through the run
    rows = [
        Request(p, adapter=a, sampling=SamplingParams(max_new_tokens=budget, ignore_eos=True))
        for p, a in zip(prompts, adapters)
    ]
    for r in rows:
        engine.add_request(r)
    ids = {r.request_id for r in rows}
    last: dict[str, float] = {}
    gaps: list[float] = []  # from its arrival to its first token
    quiet: list[float] = []  # before it arrived: how uneven the steps are without it (other jobs on the machine)
    steps: list[float] = []  # from all rows decoding on
    before = 0  # of which before the long prompt arrived
    decoding, arrival, first, after = 0, None, None, 0
    long_request = Request(long, adapter=long_adapter, sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))
    while after < after_steps:
        start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if decoding:  # every row was decoding in this step
            steps.append(now - start)
        for out in outs:
            if out.request_id in ids and out.delta_token_ids:
                if out.request_id in last and first is None and decoding:  # all rows decoding since the last step
                    (quiet if arrival is None else gaps).append(now - last[out.request_id])
                last[out.request_id] = now
            elif out.request_id == long_request.request_id and out.token_ids and first is None:
                first = engine.scheduler.steps
        if len(last) == len(rows):
            decoding += 1
        if decoding == warm_steps and arrival is None:
            engine.add_request(long_request)
            arrival, before = engine.scheduler.steps, len(steps)
        if first is not None:
            after += 1
    for r in rows:
        engine.abort(r.request_id)
    while engine.has_unfinished():
        engine.step()
    return {
        "worst_gap_ms": 1e3 * max(gaps),
        "worst_gap_before_ms": 1e3 * max(quiet),
        "median_step_ms": 1e3 * statistics.median(steps[:before]),
        "median_step_all_ms": 1e3 * statistics.median(steps),
        "steps_to_first_token": first - arrival,
    }


def benchmark(
    preset: dict[str, Any], backbone: str, dtype: torch.dtype, on: list[int], device: str, log: Callable[[str], None]
) -> dict[str, Any]:
    rng = random.Random(0)
    model, tokenizer = pedro.load_backbone(backbone, dtype=dtype, quiet=True)
    model.to(device)
    batch, prompt_len, long_len = preset["batch"], preset["prompt_len"], preset["long_len"]
    tmp = Path(tempfile.mkdtemp(prefix="pedro-long-"))
    paths, _ = make_adapters(model, tmp, batch)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch - 1)]
    long = [rng.randrange(3, vocab) for _ in range(long_len)]
    adapters = [f"pedro-{i}" for i in range(batch - 1)]
    budgets = {"off": (batch - 1) * prompt_len + long_len, **{f"on {n}": n for n in on}}
    engines = {}
    for name, tokens in budgets.items():
        engines[name] = Engine(
            model,
            tokenizer,
            max_batch=batch,
            max_seq_len=long_len + 64,
            max_prefill_tokens=tokens,
            adapter_capacity=batch,
        )
        for i, path in enumerate(paths["pedro"]):
            engines[name].add_adapter(f"pedro-{i}", path)
    cases = [(kind, name) for kind in ("bare", "pedro") for name in budgets]
    runs: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    for rep in range(preset["repeats"] + 1):  # repeat 0 warms up (the OS commits the caches' pages) and is dropped
        for kind, name in cases:
            run = run_case(
                engines[name],
                prompts,
                adapters,
                long,
                f"pedro-{batch - 1}" if kind == "pedro" else None,
                preset["warm_steps"],
                preset["after_steps"],
            )
            run["gap_over_median_step"] = run["worst_gap_ms"] / run["median_step_ms"]
            if rep:
                runs.setdefault(f"{kind}/{name}", []).append(run)
            log(
                f"[rep {rep}] long prompt {kind:<5} budget {name:<7} worst gap {run['worst_gap_ms']:7.1f} ms  "
                f"median step {run['median_step_ms']:6.1f} ms  ratio {run['gap_over_median_step']:5.2f}  "
                f"steps to its first token {run['steps_to_first_token']}  ({time.perf_counter() - started:.0f}s)"
            )
    summary = {case: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for case, rs in runs.items()}
    return {
        "preset": preset,
        "backbone": backbone,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "budgets": budgets,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "wall_s": time.perf_counter() - started,
        "runs": runs,
        "summary": summary,
    }


def markdown(result: dict[str, Any], command: str) -> str:
    p = result["preset"]
    lines = [
        f"# Decoding rows while a long prompt arrives ({result['backbone']}, {result['dtype']}, {result['device']})",
        "",
        f"`{command}`  ",
        f"{p['batch'] - 1} rows with PEDRO adapters ({p['prompt_len']}-token prompts) decoding when one "
        f"{p['long_len']}-token prompt arrives; budget off = {result['budgets']['off']} tokens per step (the whole "
        f"prompt in one step), on N = N tokens per step. Medians over {p['repeats']} interleaved repeats; machine: "
        f"{result['machine']['platform']}, {result['machine']['cpu_threads']} torch threads, load average "
        f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average'])} at the end.",
        "",
        "| long prompt | budget | worst inter-token gap ms | median step ms (before it) | gap / median step | "
        "worst gap ms before it | median step ms (whole run) | steps to its first token |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, m in result["summary"].items():
        kind, name = case.split("/")
        lines.append(
            f"| {kind} | {name} | {m['worst_gap_ms']:.0f} | {m['median_step_ms']:.1f} | "
            f"{m['gap_over_median_step']:.2f} | {m['worst_gap_before_ms']:.0f} | {m['median_step_all_ms']:.1f} | "
            f"{m['steps_to_first_token']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", help="auto (decided for the device), bfloat16, float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--budget",
        type=int,
        nargs="+",
        default=None,
        help="max_prefill_tokens of the 'on' cases (default: the engine's)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="path prefix for .json / .md (default: results/long_prompt in the current directory; "
        "results/long_prompt-PRESET for a preset other than default)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset], name=args.preset)
    if args.repeats is not None:
        preset["repeats"] = args.repeats
    on = args.budget or [preset.get("budget") or Engine.__init__.__kwdefaults__["max_prefill_tokens"]]
    result = benchmark(
        preset,
        args.backbone,
        resolve_dtype(args.dtype, args.device),
        on,
        args.device,
        log=lambda s: print(s, flush=True),
    )
    command = "python benchmarks/long_prompt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or default_out("long_prompt", args.preset, recorded="default")
    write_report(out, result, markdown(result, command.strip()))
    return result


if __name__ == "__main__":
    main()
