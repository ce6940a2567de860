"""The engine on an accelerator: token identity against PEFT generate, the batch-32 / 32-tenant point, and the
bare step against a gpt-fast-style compiled decode of the same model.

Three checks, on ``--device`` (default cuda):

1. Identity, in float32: a mixed batch (bare rows, PEDRO, LoRA r=8 on q,v, LoRA on q,v,up, (IA)3; more
   requests than rows, so rows join while others decode) through the engine with decode graphs and without,
   each request's greedy tokens compared with the same request alone through transformers ``generate`` with
   its PEFT model on the same device. Reported, not asserted: on a GPU, kernels that differ between the two
   paths (a GEMM over 4 rows or over 1) can flip a near-tie.
2. Throughput, in ``--dtype``: the multitenant benchmark's batch-32 / 32-distinct-adapter point (benchmarks/
   multitenant.py's adapters and engine runs): the bare engine, PEDRO and LoRA r=8 with decode graphs, the bare
   engine without them, and the bare engine with the device's other choice of q/k/v and gate/up GEMMs (one per
   module on an accelerator, fused on a CPU), interleaved repeat by repeat, each ratio to the bare engine of
   the same repeat.
3. Reference: benchmarks/graph_reference.py's decode step (compiled with CUDA graphs on a GPU, eager
   elsewhere) at the same batch and width, its logits first checked against the model's forward.

On a CUDA device the engine replays decode steps from CUDA graphs; elsewhere it runs their padded steps
eagerly (``decode_graphs="padded"``), so the CPU form checks the same code. Writes ``--out``.json / .md
(default results/gpu in the current directory, results/gpu-ci for the ci preset) after each check. ``--preset ci`` is a seconds-long form for any device, ``--device cpu``
included (the test suite runs it on a tiny model). ``--random-init`` builds the model from its directory's
config with random weights, for a machine the weights file cannot reach (the timings depend on the shapes).

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
import graph_reference  # noqa: E402
from common import default_out, write_report  # noqa: E402
from multitenant import CORE_METHODS, make_adapters, run_engine  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(batch=32, tenants=32, prompt_len=128, new_tokens=128, repeats=3, identity_new_tokens=32),
    "ci": dict(batch=4, tenants=4, prompt_len=8, new_tokens=4, repeats=1, identity_new_tokens=4),
}
# (method, tenant, prompt length) of the identity check's requests; None: the bare backbone
# (the first four are prefilled together: two PEDRO tenants there run their generator heads stacked)
IDENTITY_PLAN = [
    (None, 0, 9),
    ("pedro", 0, 17),
    ("pedro", 1, 7),
    ("lora_r8_qv", 1, 5),
    ("ia3", 2, 12),
    ("lora_matched", 3, 21),
    (None, 0, 14),
    ("ia3", 0, 3),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def identity(
    model: torch.nn.Module,
    tokenizer: Any,
    paths: dict[str, list[Path]],
    new_tokens: int,
    rng: random.Random,
    graphs: str,
) -> dict[str, Any]:
    """The mixed batch through the engine, with decode graphs (``graphs``) and without, vs each request alone
    through PEFT generate on the same device."""
    vocab = model.config.vocab_size
    plan = [(m, t, [rng.randrange(3, vocab) for _ in range(n)]) for m, t, n in IDENTITY_PLAN]
    outputs = {}
    for mode in (graphs, "off"):
        engine = Engine(
            model, tokenizer, max_batch=4, max_seq_len=64 + new_tokens, adapter_capacity=8, decode_graphs=mode
        )
        for method, tenant, _ in plan:
            if method is not None and f"{method}-{tenant}" not in {a["name"] for a in engine.list_adapters()}:
                engine.add_adapter(f"{method}-{tenant}", paths[method][tenant])
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        outputs[mode] = engine.generate([Request(p, adapter=m and f"{m}-{t}", sampling=sampling) for m, t, p in plan])
    reference = copy.deepcopy(model)
    rows = []
    for i, (method, tenant, prompt) in enumerate(plan):
        ref = peft.PeftModel.from_pretrained(reference, str(paths[method][tenant])) if method else reference
        expected = greedy_continuation(ref, prompt, new_tokens)
        if method:
            reference = ref.unload()  # the plain backbone modules back, for the next adapter
        got, eager = outputs[graphs][i], outputs["off"][i]
        rows.append(
            {
                "adapter": method,
                "prompt_len": len(prompt),
                "identical": got.token_ids == expected,
                "first_difference": _first_difference(got.token_ids, expected),
                "identical_without_graphs": eager.token_ids == expected,
                "graphs_equal_eager": got.token_ids == eager.token_ids,
                "error": got.error or eager.error,
            }
        )
    return {
        "graphs": graphs,
        "requests": rows,
        "identical": sum(r["identical"] for r in rows),
        "identical_without_graphs": sum(r["identical_without_graphs"] for r in rows),
        "graphs_equal_eager": sum(r["graphs_equal_eager"] for r in rows),
        "total": len(rows),
    }


def _first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def throughput(
    model: torch.nn.Module,
    tokenizer: Any,
    paths: dict[str, list[Path]],
    preset: dict[str, Any],
    rng: random.Random,
    graphs: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The batch / tenants point: each core method with decode graphs, the bare engine without them and with the
    other choice of fused GEMMs, interleaved over repeats; ratios to the bare engine (with graphs) of the same
    repeat."""
    batch, tenants, P, N = preset["batch"], preset["tenants"], preset["prompt_len"], preset["new_tokens"]
    # the engine as it runs on the device, without graphs, and with the other choice of fused q/k/v and gate/up
    # GEMMs (the device's default: fused on an accelerator, one GEMM per module on a CPU)
    fused = next(model.parameters()).device.type != "cpu"
    modes = {graphs: (graphs, None), "off": ("off", None), "fusion": (graphs, not fused)}
    engines = {
        mode: Engine(
            model,
            tokenizer,
            max_batch=batch,
            max_seq_len=P + N + 1,
            max_prefill_tokens=batch * P,
            adapter_capacity=2 * tenants,
            decode_graphs=decode_graphs,
            fuse_projections=fuse,
        )
        for mode, (decode_graphs, fuse) in modes.items()
    }
    for method in CORE_METHODS[1:]:
        for i in range(tenants):
            engines[graphs].add_adapter(f"{method}-{i}", paths[method][i])
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(P)] for _ in range(batch)]
    plan = [(method, graphs) for method in CORE_METHODS] + [("bare", "off"), ("bare", "fusion")]
    other = "bare, one GEMM per module" if fused else "bare, fused q/k/v and gate/up"
    names = {graphs: None, "off": "bare, no graphs", "fusion": other}
    for method, mode in plan:  # untimed: first-use costs (allocations, kernel selection, graph capture)
        adapters = [None] * batch if method == "bare" else [f"{method}-{i % tenants}" for i in range(batch)]
        run_engine(engines[mode], prompts, adapters, N)
    runs: dict[str, list[dict[str, float]]] = {}
    for rep in range(preset["repeats"]):
        for method, mode in plan:
            name = names[mode] or method
            adapters = [None] * batch if method == "bare" else [f"{method}-{i % tenants}" for i in range(batch)]
            run = run_engine(engines[mode], prompts, adapters, N)
            runs.setdefault(name, []).append(
                {
                    "decode_tok_s": run.decode_tok_s,
                    "prefill_tok_s": run.prefill_tok_s,
                    "end_to_end_tok_s": run.end_to_end_tok_s,
                    "step_p50_ms": run.step_p50_ms,
                }
            )
            log(
                f"[rep {rep}] b{batch}-t{tenants} {name:<15} decode {run.decode_tok_s:9.1f} tok/s  "
                f"prefill {run.prefill_tok_s:9.1f} tok/s  step p50 {run.step_p50_ms:6.2f} ms"
            )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for key in ("decode_tok_s", "prefill_tok_s", "end_to_end_tok_s"):
            summary[name][f"{key}_vs_bare"] = statistics.median(r[key] / b[key] for r, b in zip(rs, runs["bare"]))
    captures = engines[graphs].runner.graphs.captures if engines[graphs].runner.graphs else 0
    forward = {mode: forward_ms(engines[mode], batch, P, N) for mode in (graphs, "off")}
    log(f"the bare decode forward alone, p50: {forward[graphs]:.2f} ms with graphs, {forward['off']:.2f} ms without")
    return {
        "batch": batch,
        "tenants": tenants,
        "prompt_len": P,
        "new_tokens": N,
        "summary": summary,
        "captures": captures,
        "forward_p50_ms": forward[graphs],
        "forward_p50_ms_no_graphs": forward["off"],
    }


def forward_ms(engine: Engine, batch: int, position: int, steps: int) -> float:
    """Median time of the runner's bare decode forward alone for ``batch`` rows at ``position``, its tokens read
    on the host: a step's time less the engine's scheduling and sampling. Run on an idle engine; its slots'
    lengths are put back."""
    lengths = engine.cache.lengths.clone()
    tokens = torch.randint(3, engine.vocab_size, (batch,), device=engine.device)
    times = []
    for _ in range(steps):
        engine.cache.lengths[:batch] = position
        start = time.perf_counter()
        engine.runner.decode(tokens).argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    engine.cache.lengths.copy_(lengths)
    return 1e3 * statistics.median(times)


def reference_point(model: torch.nn.Module, preset: dict[str, Any], compile_step: bool, log: Callable[[str], None]):
    """The gpt-fast-style reference step (graph_reference.py) at the throughput point's batch and width, after
    checking its logits against the model's own forward."""
    batch, P, N = preset["batch"], preset["prompt_len"], preset["new_tokens"]
    error = graph_reference.check(model, list(range(3, 3 + min(P, 32))))
    log(f"reference: max |logit difference| from the model's forward {error:.3g}")
    timing = graph_reference.step_times(model, batch, P + N + 1, P, N, compile_step, log)
    return {"max_logit_difference": error, **timing}


def markdown(result: dict[str, Any]) -> str:
    ident = result["identity"]
    lines = [
        f"# The engine on {result['device_name']} ({result['backbone']})",
        "",
        f"`{result['command']}`  ",
        f"torch {result['torch']}; wall time {result['wall_s']:.0f} s. "
        + (
            "Weights: drawn at random (seed 0) in the backbone's configuration -- its shapes and kernels, not its "
            "trained weights."
            if result["random_init"]
            else "Weights: the backbone's own."
        ),
        "",
        f"## Token identity against PEFT generate (float32): {ident['identical']} / {ident['total']} requests",
        "",
        f"Decode graphs: `{ident['graphs']}`. Without them: {ident['identical_without_graphs']} / {ident['total']} "
        f"identical to PEFT; with and without them equal on {ident['graphs_equal_eager']} / {ident['total']}.",
        "",
        "| adapter | prompt tokens | identical | first different token | identical without graphs |",
        "|---|---:|---|---:|---|",
    ]
    for r in ident["requests"]:
        lines.append(
            f"| {r['adapter'] or 'bare'} | {r['prompt_len']} | {'yes' if r['identical'] else 'no'} | "
            f"{'' if r['first_difference'] is None else r['first_difference']} | "
            f"{'yes' if r['identical_without_graphs'] else 'no'} |"
        )
    point = result.get("throughput")
    if point:
        lines += [
            "",
            f"## Batch {point['batch']}, {point['tenants']} distinct adapters, {point['prompt_len']}-token prompts, "
            f"{point['new_tokens']} new tokens ({result['dtype']}); {point['captures']} graphs captured",
            "",
            "| method | decode tok/s | ×bare | prefill tok/s | ×bare | end to end tok/s | ×bare | step p50 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, m in point["summary"].items():
            lines.append(
                f"| {method} | {m['decode_tok_s']:.1f} | {m['decode_tok_s_vs_bare']:.3f} | {m['prefill_tok_s']:.1f} | "
                f"{m['prefill_tok_s_vs_bare']:.3f} | {m['end_to_end_tok_s']:.1f} | "
                f"{m['end_to_end_tok_s_vs_bare']:.3f} | {m['step_p50_ms']:.2f} |"
            )
    ref = result.get("reference")
    if ref and point:
        bare = point["summary"]["bare"]["step_p50_ms"]
        lines += [
            "",
            "## Against a gpt-fast-style decode step of the same model",
            "",
            f"benchmarks/graph_reference.py (compiled: {ref['compiled']}, CUDA graph: {ref['cuda_graph']}, ready in {ref['compile_s']:.0f} s; its "
            f"logits within {ref['max_logit_difference']:.3g} of the model's forward): step p50 "
            f"{ref['step_p50_ms']:.2f} ms at batch {point['batch']}; the engine's bare step {bare:.2f} ms, "
            f"**{bare / ref['step_p50_ms']:.2f}x** the reference's. The engine's decode forward alone (no "
            f"scheduling, no sampling; tokens read on the host): {point['forward_p50_ms']:.2f} ms, "
            f"{point['forward_p50_ms'] / ref['step_p50_ms']:.2f}x the reference's step "
            f"({point['forward_p50_ms_no_graphs']:.2f} ms without graphs).",
        ]
    return "\n".join(lines) + "\n"


def load(backbone: str, dtype: torch.dtype, random_init: bool) -> tuple[torch.nn.Module, Any]:
    """The backbone in ``dtype``: loaded, or (``random_init``) built from its directory's config with random
    weights, seed 0 -- for a machine the weights file cannot be brought to."""
    if not random_init:
        return pedro.load_backbone(backbone, dtype=dtype, quiet=True)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(backbone), dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(backbone)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument(
        "--random-init", action="store_true", help="--backbone is a directory with a config and a tokenizer only"
    )
    parser.add_argument("--dtype", default="auto", help="auto (decided for the device), bfloat16, float32")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="path prefix for .json / .md (default: results/gpu in the current directory; "
        "results/gpu-PRESET for a preset other than full)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the reference step (compiling it takes ~1 min)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu (and --preset ci for the short form)")
    preset = dict(PRESETS[args.preset], name=args.preset)
    out = args.out or default_out("gpu", args.preset, recorded="full")
    dtype = resolve_dtype(args.dtype, device)
    graphs = "auto" if device.type == "cuda" else "padded"  # CUDA graphs; elsewhere their padded steps, eagerly
    started = time.perf_counter()
    rng = random.Random(0)
    log = lambda s: print(s, flush=True)  # noqa: E731
    exact, tokenizer = load(args.backbone, torch.float32, args.random_init)
    paths, _ = make_adapters(exact, Path(tempfile.mkdtemp(prefix="pedro-gpu-")), max(preset["tenants"], 6))
    result: dict[str, Any] = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": device_name(device),
        "backbone": args.backbone,
        "random_init": args.random_init,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "preset": preset,
    }

    def report() -> None:  # after each part, so a run cut short keeps what it measured
        result["wall_s"] = time.perf_counter() - started
        write_report(out, result, markdown(result))

    result["identity"] = identity(exact.to(device), tokenizer, paths, preset["identity_new_tokens"], rng, graphs)
    ident = result["identity"]
    log(f"identity: {ident['identical']} / {ident['total']} requests token-identical to PEFT generate")
    report()
    del exact
    model = load(args.backbone, dtype, args.random_init)[0].to(device)
    result["throughput"] = throughput(model, tokenizer, paths, preset, rng, graphs, log)
    report()
    if not args.no_reference:
        result["reference"] = reference_point(model, preset, device.type == "cuda", log)
        report()
    return result


if __name__ == "__main__":
    main()
