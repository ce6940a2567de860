"""The engine on an accelerator: token identity against PEFT generate, and the batch-32 / 32-tenant point.

Two checks, on ``--device`` (default cuda):

1. Identity, in float32: a mixed batch (bare rows, PEDRO, LoRA r=8 on q,v, LoRA on q,v,up, (IA)3; more
   requests than rows, so rows join while others decode) through the engine, each request's greedy tokens
   compared with the same request alone through transformers ``generate`` with its PEFT model on the same
   device. Reported, not asserted: on a GPU, kernels that differ between the two paths can flip a near-tie.
2. Throughput, in ``--dtype``: the multitenant benchmark's batch-32 / 32-distinct-adapter point (benchmarks/multitenant.py's
   adapters and engine runs): the bare engine, PEDRO and LoRA r=8 interleaved repeat by repeat, each ratio to
   the bare engine of the same repeat.

Writes ``--out``.json / .md (default results/gpu). ``--preset ci`` is a seconds-long form for any device,
``--device cpu`` included (the test suite runs it on a tiny model).

    python benchmarks/gpu_check.py                             # on a CUDA machine: SmolLM2, bf16
    python benchmarks/gpu_check.py --device cpu --preset ci --backbone DIR
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import peft
import torch

import pedro
from pedro.backbones import resolve_dtype
from pedro.engine import Engine, Request, SamplingParams
from pedro.evaluate import greedy_continuation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402
from multitenant import CORE_METHODS, make_adapters, run_engine  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(batch=32, tenants=32, prompt_len=128, new_tokens=128, repeats=3, identity_new_tokens=32),
    "ci": dict(batch=4, tenants=4, prompt_len=8, new_tokens=4, repeats=1, identity_new_tokens=4),
}
# (method, tenant, prompt length) of the identity check's requests; None: the bare backbone
IDENTITY_PLAN = [
    (None, 0, 9),
    ("pedro", 0, 17),
    ("lora_r8_qv", 1, 5),
    ("ia3", 2, 12),
    ("lora_matched", 3, 21),
    ("pedro", 1, 7),
    (None, 0, 14),
    ("ia3", 0, 3),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def identity(
    model: torch.nn.Module, tokenizer: Any, paths: dict[str, list[Path]], new_tokens: int, rng: random.Random
) -> dict[str, Any]:
    """The mixed batch through the engine vs each request alone through PEFT generate on the same device."""
    vocab = model.config.vocab_size
    plan = [(m, t, [rng.randrange(3, vocab) for _ in range(n)]) for m, t, n in IDENTITY_PLAN]
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64 + new_tokens, adapter_capacity=8)
    for method, tenant, _ in plan:
        if method is not None and f"{method}-{tenant}" not in {a["name"] for a in engine.list_adapters()}:
            engine.add_adapter(f"{method}-{tenant}", paths[method][tenant])
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outs = engine.generate([Request(p, adapter=m and f"{m}-{t}", sampling=sampling) for m, t, p in plan])
    reference = copy.deepcopy(model)
    rows = []
    for (method, tenant, prompt), out in zip(plan, outs):
        ref = peft.PeftModel.from_pretrained(reference, str(paths[method][tenant])) if method else reference
        expected = greedy_continuation(ref, prompt, new_tokens)
        if method:
            reference = ref.unload()  # the plain backbone modules back, for the next adapter
        same = out.token_ids == expected
        diverges = (
            None
            if same
            else next(
                (i for i, (a, b) in enumerate(zip(out.token_ids, expected)) if a != b),
                min(len(out.token_ids), len(expected)),
            )
        )
        rows.append(
            {
                "adapter": method,
                "prompt_len": len(prompt),
                "identical": same,
                "first_difference": diverges,
                "error": out.error,
            }
        )
    return {"requests": rows, "identical": sum(r["identical"] for r in rows), "total": len(rows)}


def throughput(
    model: torch.nn.Module,
    tokenizer: Any,
    paths: dict[str, list[Path]],
    preset: dict[str, Any],
    rng: random.Random,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The batch / tenants point: each core method interleaved over repeats, ratios to bare per repeat."""
    batch, tenants, P, N = preset["batch"], preset["tenants"], preset["prompt_len"], preset["new_tokens"]
    engine = Engine(
        model,
        tokenizer,
        max_batch=batch,
        max_seq_len=P + N + 1,
        max_prefill_tokens=batch * P,
        adapter_capacity=2 * tenants,
    )
    for method in CORE_METHODS[1:]:
        for i in range(tenants):
            engine.add_adapter(f"{method}-{i}", paths[method][i])
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(P)] for _ in range(batch)]
    run_engine(engine, prompts, [None] * batch, N)  # untimed: first-use costs (allocations, kernel selection)
    runs: dict[str, list[dict[str, float]]] = {}
    for rep in range(preset["repeats"]):
        for method in CORE_METHODS:
            adapters = [None] * batch if method == "bare" else [f"{method}-{i % tenants}" for i in range(batch)]
            run = run_engine(engine, prompts, adapters, N)
            runs.setdefault(method, []).append(
                {"decode_tok_s": run.decode_tok_s, "prefill_tok_s": run.prefill_tok_s, "step_p50_ms": run.step_p50_ms}
            )
            log(
                f"[rep {rep}] b{batch}-t{tenants} {method:<11} decode {run.decode_tok_s:8.1f} tok/s  "
                f"prefill {run.prefill_tok_s:8.1f} tok/s  step p50 {run.step_p50_ms:6.2f} ms"
            )
    summary = {}
    for method, rs in runs.items():
        summary[method] = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for key in ("decode_tok_s", "prefill_tok_s"):
            summary[method][f"{key}_vs_bare"] = statistics.median(r[key] / b[key] for r, b in zip(rs, runs["bare"]))
    return {"batch": batch, "tenants": tenants, "prompt_len": P, "new_tokens": N, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    ident, point = result["identity"], result["throughput"]
    lines = [
        f"# The engine on {result['device_name']} ({result['backbone']})",
        "",
        f"`{result['command']}`  ",
        f"torch {result['torch']}; wall time {result['wall_s']:.0f} s.",
        "",
        f"## Token identity against PEFT generate (float32): {ident['identical']} / {ident['total']} requests",
        "",
        "| adapter | prompt tokens | identical | first different token |",
        "|---|---:|---|---:|",
    ]
    for r in ident["requests"]:
        lines.append(
            f"| {r['adapter'] or 'bare'} | {r['prompt_len']} | {'yes' if r['identical'] else 'no'} | "
            f"{'' if r['first_difference'] is None else r['first_difference']} |"
        )
    lines += [
        "",
        f"## Batch {point['batch']}, {point['tenants']} distinct adapters, {point['prompt_len']}-token prompts, "
        f"{point['new_tokens']} new tokens ({result['dtype']})",
        "",
        "| method | decode tok/s | ×bare | prefill tok/s | ×bare | step p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, m in point["summary"].items():
        lines.append(
            f"| {method} | {m['decode_tok_s']:.1f} | {m['decode_tok_s_vs_bare']:.3f} | {m['prefill_tok_s']:.1f} | "
            f"{m['prefill_tok_s_vs_bare']:.3f} | {m['step_p50_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", help="auto (decided for the device), bfloat16, float32")
    parser.add_argument("--out", default="results/gpu", help="path prefix for .json / .md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu (and --preset ci for the short form)")
    preset = dict(PRESETS[args.preset], name=args.preset)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    rng = random.Random(0)
    exact, tokenizer = pedro.load_backbone(args.backbone, dtype=torch.float32, quiet=True)
    paths, _ = make_adapters(exact, Path(tempfile.mkdtemp(prefix="pedro-gpu-")), max(preset["tenants"], 6))
    log = lambda s: print(s, flush=True)  # noqa: E731
    ident = identity(exact.to(device), tokenizer, paths, preset["identity_new_tokens"], rng)
    log(f"identity: {ident['identical']} / {ident['total']} requests token-identical to PEFT generate")
    del exact
    model = pedro.load_backbone(args.backbone, dtype=dtype, quiet=True)[0].to(device)
    result = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": device_name(device),
        "backbone": args.backbone,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "preset": preset,
        "identity": ident,
        "throughput": throughput(model, tokenizer, paths, preset, rng, log),
    }
    result["wall_s"] = time.perf_counter() - started
    write_report(Path(args.out), result, markdown(result))
    return result


if __name__ == "__main__":
    main()
