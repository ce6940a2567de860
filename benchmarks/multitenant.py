"""Multi-tenant serving benchmark: decode/prefill throughput vs distinct adapters per batch, one process.

Every method runs side by side in the same process, interleaved repeat by repeat, and each ratio is taken
against the bare backbone measured in the same repeat at the same batch size (then the median over repeats),
so machine drift and other tenants of the CPU cancel out as far as they can.

Methods: the engine with no adapter (bare), PEDRO, LoRA r=8 on q,v, LoRA with PEDRO's parameter count,
(IA)3 (per-row vectors, the zero-cost floor); HF PEFT mixed-batch LoRA (``generate(adapter_names=...)``);
transformers ``generate`` on the bare backbone and with one PEDRO adapter. Everything runs in one dtype
(``--dtype``, default auto: bfloat16 where the CPU has native bf16 matmuls); at the batch-32 single-tenant
point the bare engine and transformers generate also run in float32, so the engine-vs-transformers ratio is
reported in both dtypes, each side by side.

    python benchmarks/multitenant.py            # or: pedro bench multitenant; -> results/multitenant-cpu.*
    python benchmarks/multitenant.py --preset full   # the full sweep (hours on a 2-core CPU) -> results/multitenant.*
    python benchmarks/multitenant.py --peer vllm --vllm-python V  # next to vLLM (benchmarks/peer.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import peft
import torch
from safetensors.torch import load_file, save_file

import pedro
from pedro.backbones import resolve_dtype
from pedro.engine import Engine, Request, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, lockstep_turns, percentile, write_report  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # every method at both batch sizes over the tenant counts (hours on a 2-core CPU)
    "full": dict(
        sweep={32: [1, 4, 16, 32], 64: [1, 4, 16, 32, 64]},
        all_methods_at=[32, 64],
        prompt_len=128,
        new_tokens=128,
        repeats=3,
        hf_new_tokens=128,
        long_prompt=512,
        long_batch=8,
        hf_tenants=[1, 4, 16, 32],
        prefill_rounds=9,
    ),
    # sized to finish in ~25 minutes on a shared 2-core CPU (see docs/engine.md): short prompts and 16 decode
    # steps (decode throughput is per step, so fewer steps cost precision, not meaning); at batch 64 only
    # bare / PEDRO / LoRA r=8
    "cpu": dict(
        sweep={32: [1, 4, 16, 32], 64: [1, 16, 64]},
        all_methods_at=[32],
        prompt_len=32,
        new_tokens=16,
        repeats=3,
        hf_new_tokens=8,
        long_prompt=256,
        long_batch=8,
        hf_tenants=[4, 32],
        prefill_rounds=9,
    ),
    # the targets only (batch 32 at 1 and 32 tenants, 128-token prompts and 128 new tokens as the targets are
    # stated; transformers at 32 steps): ~20 minutes, to re-check a change
    "targets": dict(
        sweep={32: [1, 32]},
        all_methods_at=[32],
        prompt_len=128,
        new_tokens=128,
        repeats=3,
        hf_new_tokens=32,
        long_prompt=512,
        long_batch=8,
        hf_tenants=[32],
        prefill_rounds=9,
    ),
    # seconds, for a smoke test of the script itself
    "smoke": dict(
        sweep={4: [1, 4]},
        all_methods_at=[4],
        prompt_len=8,
        new_tokens=4,
        repeats=1,
        hf_new_tokens=3,
        long_prompt=16,
        long_batch=2,
        hf_tenants=[4],
        prefill_rounds=1,
    ),
}
POPULARITY = ("distinct", "uniform16", "zipf", "identical")
ENGINE_METHODS = ("bare", "pedro", "lora_r8_qv", "lora_matched", "ia3")
CORE_METHODS = ENGINE_METHODS[:3]


# ----------------------------------------------------------------------------------------- adapters


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _clone_adapter(template: Path, target: Path, seed: int, scale: float, offset: float = 0.0) -> None:
    """Same config and shapes as ``template``, fresh random weights (different tenants, different weights)."""
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    save_file(
        {k: (torch.randn(v.shape, generator=g) * scale + offset).contiguous() for k, v in tensors.items()},
        str(target / "adapter_model.safetensors"),
    )


def make_adapters(model: torch.nn.Module, root: Path, n: int) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """``n`` tenants of each adapter kind, saved as PEFT directories -> (paths per method, params per method)."""
    pedro_config = pedro.PedroConfig(r=8)
    pedro_params = pedro.count_trainable_parameters(pedro_config, model)
    d = model.config.hidden_size
    kv = model.config.num_key_value_heads * (d // model.config.num_attention_heads)
    ff = model.config.intermediate_size
    matched_rank = max(1, round(pedro_params / (model.config.num_hidden_layers * ((d + d) + (d + kv) + (d + ff)))))
    configs = {
        "pedro": pedro_config,
        "lora_r8_qv": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "lora_matched": peft.LoraConfig(
            r=matched_rank,
            lora_alpha=2 * matched_rank,
            target_modules=["q_proj", "v_proj", "up_proj"],
            task_type="CAUSAL_LM",
        ),
        "ia3": peft.IA3Config(
            target_modules=["q_proj", "k_proj", "up_proj"], feedforward_modules=[], task_type="CAUSAL_LM"
        ),
    }
    paths: dict[str, list[Path]] = {}
    params: dict[str, int] = {}
    for method, config in configs.items():
        template = root / f"{method}-template"
        wrapped = peft.get_peft_model(model, config)
        wrapped.save_pretrained(str(template))
        params[method] = sum(p.numel() for p in load_file(str(template / "adapter_model.safetensors")).values())
        wrapped.unload()  # restores the plain backbone modules in place
        offset = 1.0 if method == "ia3" else 0.0
        paths[method] = []
        for i in range(n):
            path = root / f"{method}-{i}"
            _clone_adapter(template, path, seed=1000 * len(paths) + i, scale=0.02, offset=offset)
            paths[method].append(path)
    return paths, params


def assignment(batch: int, tenants: int, pattern: str, rng: random.Random) -> list[int]:
    """Which tenant each row uses. ``tenants`` distinct adapters (cycled) for the sweep; popularity patterns
    draw from a pool: uniform over 16, Zipf(1.1) over 64, or one for all."""
    if pattern == "distinct":
        return [i % tenants for i in range(batch)]
    if pattern == "uniform16":
        return [rng.randrange(16) for _ in range(batch)]
    if pattern == "zipf":
        weights = [1 / (k + 1) ** 1.1 for k in range(64)]
        return rng.choices(range(64), weights=weights, k=batch)
    if pattern == "identical":
        return [0] * batch
    raise ValueError(pattern)


# ----------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    decode_tok_s: float
    prefill_tok_s: float
    end_to_end_tok_s: float  # generated tokens over the whole call, prefill included
    # the same over this process's CPU time: time spent descheduled does not count
    end_to_end_cpu_tok_s: float
    step_p50_ms: float
    step_p99_ms: float
    ttft_s: float
    rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_engine(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> Run:
    # warm-up: make this run's adapters resident (a previous method's may have been evicted)
    engine.generate(
        [Request(p[:2], adapter=a, sampling=SamplingParams(max_new_tokens=1)) for p, a in zip(prompts, adapters)]
    )
    engine.reset_stats()
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = engine.generate([Request(p, adapter=a, sampling=sampling) for p, a in zip(prompts, adapters)])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(errors[0])
    steps = [s for _, s in engine.stats["decode"]]
    rows = sum(n for n, _ in engine.stats["decode"])
    prefill_tokens = sum(n for n, _ in engine.stats["prefill"])
    prefill_s = sum(s for _, s in engine.stats["prefill"])
    return Run(
        decode_tok_s=rows / sum(steps),
        prefill_tok_s=prefill_tokens / prefill_s,
        end_to_end_tok_s=sum(len(o.token_ids) for o in outs) / wall,
        end_to_end_cpu_tok_s=sum(len(o.token_ids) for o in outs) / cpu,
        step_p50_ms=1e3 * statistics.median(steps),
        step_p99_ms=1e3 * percentile(steps, 99),
        ttft_s=statistics.median(o.metrics["ttft_s"] for o in outs),
        rss_mb=_rss_mb(),
        extra={"prefill_steps": len(engine.stats["prefill"])},
    )


class _Stamps:
    """A stopping criterion that never stops: it timestamps every generation step of transformers generate."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_hf(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> Run:
    ids = torch.tensor(prompts)
    stamps = _Stamps()
    with torch.inference_mode():
        start, cpu_start = time.perf_counter(), time.process_time()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=[stamps],
            **kwargs,
        )
        cpu = time.process_time() - cpu_start
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    return Run(
        decode_tok_s=len(prompts) * len(steps) / sum(steps),
        prefill_tok_s=ids.numel() / (stamps.times[0] - start),
        end_to_end_tok_s=len(prompts) * len(stamps.times) / (stamps.times[-1] - start),
        end_to_end_cpu_tok_s=len(prompts) * len(stamps.times) / cpu,
        step_p50_ms=1e3 * statistics.median(steps),
        step_p99_ms=1e3 * percentile(steps, 99),
        ttft_s=stamps.times[0] - start,
        rss_mb=_rss_mb(),
    )


def run_lockstep(
    engines: dict[str, Engine], prompts: list[list[int]], adapters: dict[str, list[str | None]], new_tokens: int
) -> dict[str, dict[str, float]]:
    """Every method's engine generates the same prompts *step for step* with the others: one ``step()`` of each
    in turn, the order rotated every round. A slow stretch of a shared machine (another tenant of the host, a
    noisy neighbour on the memory bus) then hits every method's step of that round alike, which sequential
    runs, seconds apart, cannot promise: on this 2-core host one method's identical runs swing by 1.5x.
    -> per method: the sums of its decode-step and prefill-step times (the engine's own clock) and of its
    ``step()`` calls' wall time (everything the engine does per step: scheduling, sampling, detokenising)."""
    names = list(engines)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    wall = dict.fromkeys(names, 0.0)
    for name, engine in engines.items():
        engine.reset_stats()
        for prompt, adapter in zip(prompts, adapters[name]):
            engine.add_request(Request(prompt, adapter=adapter, sampling=sampling))
    for name in lockstep_turns(names, lambda name: engines[name].has_unfinished()):
        start = time.perf_counter()
        engines[name].step()
        wall[name] += time.perf_counter() - start
    return {
        name: {
            "decode_s": sum(s for _, s in engine.stats["decode"]),
            "prefill_s": sum(s for _, s in engine.stats["prefill"]),
            "step_calls_s": wall[name],
        }
        for name, engine in engines.items()
    }


def summarise_lockstep(
    repeats: list[dict[str, dict[str, float]]], prefill_rounds: list[dict[str, dict[str, float]]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method: each repeat's time ratios bare / method (>1: faster than bare), and their medians. A repeat
    holds one prefill step per method (a whole batch's prompts), a single sample of a second or so that a slow
    stretch of the host can move by 10 %, so prefill is also read over ``prefill_rounds``: lockstep runs that
    only prefill (and decode one token)."""
    keys = {"decode": "decode_s", "prefill": "prefill_s", "end_to_end": "step_calls_s"}
    out: dict[str, dict[str, Any]] = {}
    for name in repeats[0]:
        entry: dict[str, Any] = {"repeats": len(repeats)}
        for label, key in keys.items():
            runs = repeats + (prefill_rounds or []) if label == "prefill" else repeats
            ratios = [r["bare"][key] / r[name][key] for r in runs]
            entry[f"{label}_vs_bare"] = statistics.median(ratios)
            entry[f"{label}_vs_bare_per_repeat"] = ratios
            entry[f"{label}_s"] = statistics.median(r[name][key] for r in runs)
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------- the sweep


def summarise(runs: list[tuple[int, Run]], bare: dict[int, Run]) -> dict[str, Any]:
    """Medians over repeats, and median of the per-repeat ratios to the bare engine of the same repeat; each
    repeat's throughputs too (``<key>_by_repeat``), so any two methods can be compared repeat by repeat."""
    out: dict[str, Any] = {"repeats": len(runs)}
    throughputs = ("decode_tok_s", "prefill_tok_s", "end_to_end_tok_s", "end_to_end_cpu_tok_s")
    for key in (*throughputs, "step_p50_ms", "step_p99_ms", "ttft_s", "rss_mb"):
        out[key] = statistics.median(getattr(r, key) for _, r in runs)
    for key in throughputs:
        ratios = [getattr(r, key) / getattr(bare[rep], key) for rep, r in runs if rep in bare]
        out[f"{key}_vs_bare"] = statistics.median(ratios) if ratios else None
        out[f"{key}_by_repeat"] = {str(rep): getattr(r, key) for rep, r in runs}
    return out


def paired_ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """Method ``a`` over method ``b`` in ``key``: the median of their ratios repeat by repeat (the two ran
    seconds apart within a repeat, while repeats lie minutes apart on a host that drifts); the ratio of their
    medians for a result written before per-repeat values were kept. None where either is missing."""
    mine, theirs = a.get(f"{key}_by_repeat"), b.get(f"{key}_by_repeat")
    if mine and theirs:
        ratios = [mine[rep] / theirs[rep] for rep in mine if rep in theirs and theirs[rep]]
        return statistics.median(ratios) if ratios else None
    x, y = a.get(key), b.get(key)
    return x / y if x and y else None


def benchmark(preset: dict[str, Any], backbone: str, dtype: torch.dtype, log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(0)
    rng = random.Random(0)
    model, tokenizer = pedro.load_backbone(backbone, dtype=dtype, quiet=True)
    vocab = model.config.vocab_size
    n_adapters = max(max(t for ts in preset["sweep"].values() for t in ts), 64)  # Zipf draws from 64 tenants
    tmp = Path(tempfile.mkdtemp(prefix="pedro-bench-"))
    paths, params = make_adapters(model, tmp, n_adapters)
    log(f"adapters: {n_adapters} per method in {tmp}; parameters per adapter: {params}")
    P, N = preset["prompt_len"], preset["new_tokens"]

    low = min(100, vocab // 2)  # past the special tokens of a real vocabulary; a tiny test one has ~100 ids

    def prompts_for(batch: int, length: int) -> list[list[int]]:
        return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(batch)]

    # points: (label, batch, tenants, pattern, prompt_len)
    points: list[tuple[str, int, int, str, int]] = []
    for batch, sweep in preset["sweep"].items():
        for tenants in sweep:
            points.append((f"b{batch}-t{tenants}", batch, tenants, "distinct", P))
    popularity_batch = 32 if 32 in preset["sweep"] else next(iter(preset["sweep"]))
    for pattern in ("uniform16", "zipf"):  # "distinct" and "identical" are the sweep's t=batch and t=1 points
        points.append((f"b{popularity_batch}-{pattern}", popularity_batch, 0, pattern, P))
    points.append(
        (
            f"long-b{preset['long_batch']}-p{preset['long_prompt']}",
            preset["long_batch"],
            preset["long_batch"],
            "distinct",
            preset["long_prompt"],
        )
    )

    engines: dict[tuple[int, int], Engine] = {}

    def new_engine(
        batch: int, prompt_len: int, on: torch.nn.Module = model, capacity: int = 64, exact_gemms: bool = True
    ) -> Engine:
        return Engine(
            on,
            tokenizer,
            max_batch=batch,
            max_seq_len=prompt_len + N + 1,
            max_prefill_tokens=batch * prompt_len,
            adapter_capacity=capacity,
            exact_gemms=exact_gemms,
        )

    def engine_for(batch: int, prompt_len: int, on: torch.nn.Module = model) -> Engine:
        key = (batch, prompt_len, next(on.parameters()).dtype)
        if key not in engines:
            engines[key] = new_engine(batch, prompt_len, on)
            for method in ENGINE_METHODS[1:]:
                for i, path in enumerate(paths[method]):
                    engines[key].add_adapter(f"{method}-{i}", path)
            # untimed full-length run: the OS commits the cache's pages on first write, which must not be
            # charged to whichever method happens to run first
            run_engine(engines[key], prompts_for(batch, prompt_len), [None] * batch, N)
        return engines[key]

    def fast_fp32_engine(batch: int, prompt_len: int, on: torch.nn.Module) -> Engine:
        """The bare fp32 engine with oneDNN's GEMMs (``exact_gemms=False``: within rounding of F.linear)."""
        key = (batch, prompt_len, "fp32-onednn")
        if key not in engines:
            engines[key] = new_engine(batch, prompt_len, on, exact_gemms=False)
            run_engine(engines[key], prompts_for(batch, prompt_len), [None] * batch, N)
        return engines[key]

    fixed_prompts = {(label, b, pl): prompts_for(b, pl) for label, b, _, _, pl in points}
    results: dict[str, dict[str, list[tuple[int, Run]]]] = {}
    bare_by_batch: dict[tuple[str, int], dict[int, Run]] = {}

    # HF baselines on separate copies of the backbone (PEFT wraps modules in place)
    hf_model, _ = pedro.load_backbone(backbone, dtype=dtype, quiet=True)
    hf_pedro = peft.PeftModel.from_pretrained(
        pedro.load_backbone(backbone, dtype=dtype, quiet=True)[0], str(paths["pedro"][0])
    )
    hf_lora = peft.PeftModel.from_pretrained(
        pedro.load_backbone(backbone, dtype=dtype, quiet=True)[0], str(paths["lora_r8_qv"][0]), adapter_name="t0"
    )
    # float32 side by side (the exact default): the bare engine and transformers generate on one fp32 copy
    fp32_model = pedro.load_backbone(backbone, quiet=True)[0] if dtype != torch.float32 else None
    for i in range(1, max(preset["hf_tenants"])):
        hf_lora.load_adapter(str(paths["lora_r8_qv"][i]), adapter_name=f"t{i}")
    N_hf = preset["hf_new_tokens"]

    started = time.perf_counter()
    for rep in range(preset["repeats"]):
        for label, batch, tenants, pattern, prompt_len in points:
            engine = engine_for(batch, prompt_len)
            prompts = fixed_prompts[(label, batch, prompt_len)]
            rows = assignment(batch, tenants, pattern, random.Random(rep))
            for method in ENGINE_METHODS if batch in preset["all_methods_at"] else CORE_METHODS:
                adapters = [None] * batch if method == "bare" else [f"{method}-{t}" for t in rows]
                run = run_engine(engine, prompts, adapters, N)
                results.setdefault(label, {}).setdefault(f"engine:{method}", []).append((rep, run))
                if method == "bare":
                    bare_by_batch.setdefault((label, 0), {})[rep] = run
                log(
                    f"[rep {rep}] {label:>18} engine:{method:<13} decode {run.decode_tok_s:7.1f} tok/s  "
                    f"prefill {run.prefill_tok_s:7.1f} tok/s  step p50 {run.step_p50_ms:6.1f} ms  "
                    f"({time.perf_counter() - started:.0f}s)"
                )
            if pattern == "distinct" and prompt_len == P and batch == popularity_batch:
                hf_runs = []
                if tenants == 1:
                    hf_runs.append(("hf:generate_bare", lambda: run_hf(hf_model, prompts, N_hf)))
                    hf_runs.append(("hf:generate_pedro_single", lambda: run_hf(hf_pedro, prompts, N_hf)))
                    if fp32_model is not None:  # the engine generates as many tokens as transformers here
                        fp32_engine = engine_for(batch, prompt_len, fp32_model)
                        fast = fast_fp32_engine(batch, prompt_len, fp32_model)
                        hf_runs.append(
                            ("engine:bare_fp32", lambda: run_engine(fp32_engine, prompts, [None] * batch, N_hf))
                        )
                        hf_runs.append(
                            ("engine:bare_fp32_onednn", lambda: run_engine(fast, prompts, [None] * batch, N_hf))
                        )
                        hf_runs.append(("hf:generate_bare_fp32", lambda: run_hf(fp32_model, prompts, N_hf)))
                if tenants in preset["hf_tenants"]:
                    names = [f"t{t}" for t in rows]
                    hf_runs.append(
                        ("hf:peft_mixed_lora_r8_qv", lambda: run_hf(hf_lora, prompts, N_hf, adapter_names=names))
                    )
                for name, fn in hf_runs:
                    run = fn()
                    results[label].setdefault(name, []).append((rep, run))
                    log(
                        f"[rep {rep}] {label:>18} {name:<20} decode {run.decode_tok_s:7.1f} tok/s  "
                        f"prefill {run.prefill_tok_s:7.1f} tok/s  ({time.perf_counter() - started:.0f}s)"
                    )
            gc.collect()

    # the batch's all-distinct point once more, every method's engine stepping in turn with the others
    batch = popularity_batch
    lockstep_label = f"b{batch}-t{batch}"
    prompts = fixed_prompts.get((lockstep_label, batch, P)) or prompts_for(batch, P)
    adapters = {m: [None if m == "bare" else f"{m}-{t}" for t in range(batch)] for m in ENGINE_METHODS}
    step_engines: dict[str, Engine] = {}
    for method in ENGINE_METHODS:
        engine = new_engine(batch, P, capacity=batch)
        for t in range(batch) if method != "bare" else ():
            engine.add_adapter(f"{method}-{t}", paths[method][t])
        run_engine(engine, prompts, adapters[method], N)  # untimed: adapters resident, cache pages committed
        step_engines[method] = engine
    lockstep_runs = []
    for rep in range(preset["repeats"]):
        lockstep_runs.append(run_lockstep(step_engines, prompts, adapters, N))
        ratios = summarise_lockstep(lockstep_runs[-1:])
        log(
            f"[rep {rep}] lockstep {lockstep_label}: decode vs bare "
            + ", ".join(f"{m} {r['decode_vs_bare']:.3f}" for m, r in ratios.items() if m != "bare")
            + f"  ({time.perf_counter() - started:.0f}s)"
        )
    prefill_rounds = [run_lockstep(step_engines, prompts, adapters, 2) for _ in range(preset["prefill_rounds"])]
    lockstep = {
        "point": lockstep_label,
        "batch": batch,
        "prompt_len": P,
        "new_tokens": N,
        "prefill_rounds": len(prefill_rounds),
        "methods": summarise_lockstep(lockstep_runs, prefill_rounds),
    }
    del step_engines
    gc.collect()

    table: dict[str, dict[str, Any]] = {}
    for label, batch, tenants, pattern, prompt_len in points:
        bare = bare_by_batch[(label, 0)]
        table[label] = {
            "batch": batch,
            "tenants": tenants if pattern == "distinct" else None,
            "pattern": pattern,
            "prompt_len": prompt_len,
            "methods": {m: summarise(r, bare) for m, r in results[label].items()},
        }
    some_engine = next(iter(engines.values()))
    return {
        "preset": preset,
        "backbone": backbone,
        "dtype": str(dtype).removeprefix("torch."),
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "processor": platform.processor(),
        },
        "adapter_parameters": params,
        "adapter_bytes_fp32": {k: 4 * v for k, v in params.items()},
        "pedro_state_bytes_per_request": some_engine.pedro_state_bytes("pedro-0"),
        "kv_cache_bytes_per_token": some_engine.cache.bytes_per_token(),
        "peak_rss_mb": _peak_rss_mb(),
        "wall_s": time.perf_counter() - started,
        "points": table,
        "lockstep": lockstep,
    }


# ----------------------------------------------------------------------------------------- report


STATED = "b32-t32"  # the point the targets are stated at: batch 32, 32 distinct adapters (b32-t1: one)


@dataclass
class Target:
    """One of the engine's performance targets as a run measured it: ``point`` is the point the value was read
    at (``lockstep``: by the lockstep runs) and ``stated`` the one the target is stated at. A target read
    at another point (a smoke preset's b4-t4) is not comparable with it, and one the run did not measure at all
    is neither met nor missed."""

    description: str
    measured: float | None
    threshold: float
    stated: str
    point: str | None
    lockstep: bool = False

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if self.point != self.stated:
            return "not comparable"
        return "PASS" if self.measured >= self.threshold else "MISS"

    def line(self) -> str:
        """The report's line for it: the verdict, the target and where its value was measured."""
        where = _point_words(self.stated)
        if self.measured is None:
            return f"- **{self.verdict}** {self.description} at {where} (target {self.threshold})"
        how = " (lockstep)" if self.lockstep else ""
        value = f"{self.measured:.3f} (target {self.threshold})"
        if self.verdict == "not comparable":
            return (
                f"- **{self.verdict}** {self.description}: stated at {where}, measured at "
                f"{_point_words(self.point or '')}{how}: {value}"
            )
        return f"- **{self.verdict}** {self.description} at {where}{how}: measured {value}"


def _point_words(label: str) -> str:
    """``b32-t32`` -> ``b32-t32 (batch 32, 32 tenants)``; any other label as it is."""
    match = re.fullmatch(r"b(\d+)-t(\d+)", label)
    if not match:
        return label
    batch, tenants = match.groups()
    return f"{label} (batch {batch}, {tenants} tenant{'' if tenants == '1' else 's'})"


def targets(result: dict[str, Any]) -> list[Target]:
    """The engine's performance targets, each with the value this run measured for it and where."""
    points = result["points"]
    t32 = points.get(STATED, {}).get("methods", {})
    t1 = points.get("b32-t1", {}).get("methods", {})

    def get(methods: dict, name: str, key: str) -> float | None:
        return methods.get(name, {}).get(key)

    def ratio(methods: dict, a: str, b: str) -> float | None:
        return paired_ratio(methods.get(a, {}), methods.get(b, {}), "decode_tok_s")

    # PEDRO against the bare backbone: from the lockstep runs, the more precise of the benchmark's two side-by-side
    # measurements (see run_lockstep), at the point they ran; a result written before it had them reads the
    # interleaved sequential runs
    lockstep = result.get("lockstep") or {}
    stepped = lockstep.get("methods", {}).get("pedro")

    def vs_bare(description: str, key: str, threshold: float) -> Target:
        if stepped:
            return Target(description, stepped[f"{key}_vs_bare"], threshold, STATED, lockstep.get("point"), True)
        return Target(description, get(t32, "engine:pedro", f"{key}_tok_s_vs_bare"), threshold, STATED, STATED)

    checks = [
        vs_bare("PEDRO decode >= 0.98x bare backbone", "decode", 0.98),
        vs_bare("PEDRO end to end (prefill included) >= 0.95x bare backbone", "end_to_end", 0.95),
        Target(
            "PEDRO decode >= 2.5x HF PEFT mixed-batch LoRA",
            ratio(t32, "engine:pedro", "hf:peft_mixed_lora_r8_qv"),
            2.5,
            STATED,
            STATED,
        ),
        Target(
            f"engine bare decode >= 2x transformers generate (both {result['dtype']})",
            ratio(t1, "engine:bare", "hf:generate_bare"),
            2.0,
            "b32-t1",
            "b32-t1",
        ),
    ]
    fp32 = ratio(t1, "engine:bare_fp32", "hf:generate_bare_fp32")
    if fp32 is not None:
        description = "engine bare decode >= 1.3x transformers generate (both float32)"
        checks.append(Target(description, fp32, 1.3, "b32-t1", "b32-t1"))
    checks.append(vs_bare("PEDRO prefill overhead <= 5% (prefill throughput >= 0.95x bare)", "prefill", 0.95))
    return checks


def cpu_ratios(result: dict[str, Any]) -> list[tuple[str, float]]:
    """The targets' end-to-end comparisons by CPU time (``end_to_end_cpu_tok_s``), where both sides ran: they
    leave out the time a run spent descheduled, which wall-time ratios charge to whichever run it hit."""
    points = result["points"]
    t32 = points.get("b32-t32", {}).get("methods", {})
    t1 = points.get("b32-t1", {}).get("methods", {})
    out = []
    pedro = t32.get("engine:pedro", {}).get("end_to_end_cpu_tok_s_vs_bare")
    if pedro is not None:
        out.append(("PEDRO end to end vs bare backbone at 32 tenants", pedro))
    for engine, hf, dtype in (
        ("engine:bare", "hf:generate_bare", result["dtype"]),
        ("engine:bare_fp32", "hf:generate_bare_fp32", "float32"),
        ("engine:bare_fp32_onednn", "hf:generate_bare_fp32", "float32, the engine's GEMMs through oneDNN"),
    ):
        ratio = paired_ratio(t1.get(engine, {}), t1.get(hf, {}), "end_to_end_cpu_tok_s")
        if ratio is not None:
            out.append((f"engine bare vs transformers generate end to end at batch 32 ({dtype})", ratio))
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Multi-tenant serving benchmark ({result['backbone']}, {result['dtype']})",
        "",
        f"Preset: `{json.dumps(result['preset'])}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_threads']} torch threads, "
        f"torch {result['machine']['torch']}. Wall time {result['wall_s'] / 60:.1f} min, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB.",
        "",
        "Ratios are to the engine's bare backbone in the same repeat (median over repeats).",
        "",
        "End to end per CPU s: generated tokens over this process's CPU time for the call (one torch thread), so",
        "time the process spends descheduled does not count; slowdowns from hardware the host's cores share do.",
        "",
        "| point | method | decode tok/s | ×bare | prefill tok/s | ×bare | end-to-end tok/s | ×bare "
        "| end to end per CPU s | ×bare | step p50 ms | step p99 ms | TTFT s | RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, point in result["points"].items():
        for method, m in point["methods"].items():

            def f(x: float | None, fmt: str) -> str:
                return "" if x is None else format(x, fmt)

            lines.append(
                f"| {label} | {method} | {m['decode_tok_s']:.1f} | {f(m['decode_tok_s_vs_bare'], '.3f')} | "
                f"{m['prefill_tok_s']:.1f} | {f(m['prefill_tok_s_vs_bare'], '.3f')} | "
                f"{m['end_to_end_tok_s']:.1f} | {f(m['end_to_end_tok_s_vs_bare'], '.3f')} | "
                f"{m['end_to_end_cpu_tok_s']:.1f} | {f(m['end_to_end_cpu_tok_s_vs_bare'], '.3f')} | {m['step_p50_ms']:.1f} | "
                f"{m['step_p99_ms']:.1f} | {m['ttft_s']:.2f} | {m['rss_mb']:.0f} |"
            )
    lockstep = result.get("lockstep")
    if lockstep:
        lines += [
            "",
            f"## Lockstep: {lockstep['point']}, every method's engine stepping in turn with the others",
            "",
            f"The same {lockstep['batch']} prompts of {lockstep['prompt_len']} tokens, {lockstep['new_tokens']} new "
            "tokens each, one engine per method on the one backbone; each round runs one `step()` of every engine "
            "(order rotated per round), so a slow stretch of the machine hits every method alike. Ratios: bare "
            "time / method time (>1: faster than bare), median over repeats (each repeat's in brackets). End to "
            "end: the wall time of the `step()` calls, prefill, sampling and detokenising included. Prefill: "
            f"over the repeats and {lockstep.get('prefill_rounds', 0)} more lockstep rounds that only prefill the "
            "same prompts (and decode one token), since a repeat holds a single prefill step per method.",
            "",
            "| method | decode ×bare | prefill ×bare | end to end ×bare | decode s | prefill s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, m in lockstep["methods"].items():
            cells = [
                f"{m[f'{k}_vs_bare']:.3f} [{', '.join(f'{r:.3f}' for r in m[f'{k}_vs_bare_per_repeat'])}]"
                for k in ("decode", "prefill", "end_to_end")
            ]
            lines.append(f"| {method} | {' | '.join(cells)} | {m['decode_s']:.2f} | {m['prefill_s']:.2f} |")
    lines += ["", "## Targets", ""]
    lines += ["Against transformers and HF PEFT: the median of the two sides' ratios repeat by repeat.", ""]
    lines += [target.line() for target in targets(result)]
    t1 = result["points"].get("b32-t1", {}).get("methods", {})
    fast = paired_ratio(t1.get("engine:bare_fp32_onednn", {}), t1.get("hf:generate_bare_fp32", {}), "decode_tok_s")
    if fast is not None:
        lines += [
            "",
            f"Not a target: the bare engine in float32 with `exact_gemms=False` (oneDNN's GEMMs, within rounding of "
            f"`F.linear`, batch-invariant) decodes at {fast:.2f}x "
            "transformers generate; the target above is the exact default (MKL's GEMMs, `F.linear`'s bits). The "
            "float32 rows generate the transformers rows' number of tokens.",
        ]
    by_cpu = cpu_ratios(result)
    if by_cpu:
        lines += ["", "By CPU time (end to end per CPU s, paired repeat by repeat as the targets above):", ""]
        lines += [f"- {desc}: {ratio:.3f}" for desc, ratio in by_cpu]
    lines += [
        "",
        "## Memory",
        "",
        f"- per-request PEDRO state (its vectors, all layers): {result['pedro_state_bytes_per_request'] / 1024:.1f} KiB",
        f"- KV cache per token: {result['kv_cache_bytes_per_token'] / 1024:.1f} KiB",
        "- per-adapter memory (fp32): "
        + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in result["adapter_bytes_fp32"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p["batch"] for p in result["points"].values() if p["pattern"] == "distinct" and p["tenants"]})
    batches = [b for b in batches if sum(1 for p in result["points"].values() if p["batch"] == b and p["tenants"]) > 1]
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(6 * max(1, len(batches)), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sweep = sorted(
            (p["tenants"], p)
            for label, p in result["points"].items()
            if p["batch"] == batch and p["pattern"] == "distinct" and p["tenants"] and not label.startswith("long")
        )
        methods = sorted({m for _, p in sweep for m in p["methods"]})
        for method in methods:
            xs = [t for t, p in sweep if method in p["methods"]]
            ys = [p["methods"][method]["decode_tok_s"] for t, p in sweep if method in p["methods"]]
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{result['backbone']}, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    from peer import add_peer_options, run

    if any(a == "--peer" or a.startswith("--peer=") for a in argv):  # another engine side by side: peer.py
        return run(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="path prefix for .json / .md / .png (default: results/multitenant in the current directory for the "
        "full preset, results/multitenant-PRESET for any other: a shorter run never overwrites the full one's)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="override the preset's repeats")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CPUs with native bf16), bfloat16, float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a CPU shared with other jobs, 2-thread GEMMs stall on each other "
        "and timings swing 2x; see docs/engine.md)",
    )
    # listed here, where a user looks for them; with --peer the whole run is peer.py's
    add_peer_options(parser.add_argument_group("next to another engine (--peer vllm --help lists all options)"))
    args = parser.parse_args(argv)
    if args.vllm_python is not None or args.fast_gemms:
        parser.error("--vllm-python and --fast-gemms apply to a run next to another engine: add --peer vllm")
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset], name=args.preset)
    if args.repeats is not None:
        preset["repeats"] = args.repeats
    result = benchmark(preset, args.backbone, resolve_dtype(args.dtype), log=lambda s: print(s, flush=True))
    out = args.out or default_out("multitenant", args.preset, recorded="full")
    write_report(out, result, markdown(result), plot)
    return result


if __name__ == "__main__":
    main()
