"""pedro's engine next to vLLM on the same work: `pedro bench multitenant --peer vllm`.

The same backbone weights (saved once from pedro's loader as a Hugging Face folder, in ``--dtype``: by default
bf16 where the CPU has native bf16, else fp32, as the engine chooses), the same prompts as
token ids, the same PEFT LoRA directories (r=8 on q,v), one batch of all prompts, greedy, every request
generating exactly ``--new-tokens`` (``ignore_eos``). vLLM runs in its own virtual environment (its torch and
transformers pins differ from pedro's) as a child process driven over a pipe (benchmarks/vllm_peer.py); its
LoRA slots are limited to the adapters' target module (``qkv_proj``: q and v live there), its best
configuration for these adapters, and its bare runs use an instance without LoRA. pedro's side has one
engine per configuration too. Each ratio is taken within one repeat, then the median over repeats.

Each configuration generates the whole batch in turn, the order rotated every repeat, timed twice: generating
``--new-tokens`` (end to end, prefill included) and generating one token (the prefill); decode tok/s is
``batch * (new_tokens - 1)`` over the difference. Each engine is driven by its own batch call (vLLM's
``LLM.generate``, pedro's ``Engine.generate``), never step by step from here: vLLM's ``LLMEngine.step()``
called from an outside loop on the same requests took 1.1-1.3x the time per step of its own ``generate``
loop on a 2-core host with AMX, so an interleaved, step-for-step measurement would understate it
(docs/engine.md, "vLLM as a peer"). Run it on a quiet host: a shared one moves sequential runs by 10 %.

The greedy tokens of the two bare engines are compared as a check that both run the same model (their
arithmetic differs, so agreement is high, not total).

    python benchmarks/multitenant.py --peer vllm --vllm-python /path/to/vllm-venv/bin/python
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
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

VLLM_PYTHON_ENV = "PEDRO_VLLM_PYTHON"


class VllmPeer:
    """One vLLM instance in a child process; ``generate`` returns (seconds, tokens per prompt)."""

    def __init__(self, python: str, spec: dict[str, Any], threads: int, log_path: Path) -> None:
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_KVCACHE_SPACE="2")
        env.pop("OMP_NUM_THREADS", None)
        self.log = open(log_path, "a", encoding="utf-8")
        driver = Path(__file__).resolve().parent / "vllm_peer.py"
        self.process = subprocess.Popen(
            [python, str(driver), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self._read()  # {"ready": true} once the model is loaded

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            raise RuntimeError(f"the vLLM process stopped (exit {self.process.wait()}); its log: {self.log.name}")
        return json.loads(line)

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def generate(self, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> tuple[float, list]:
        answer = self._ask({"prompts": prompts, "adapters": adapters, "max_tokens": max_tokens})
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class PedroPeer:
    """One pedro engine, driven as ``VllmPeer`` drives vLLM: a whole batch per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> tuple[float, list]:
        sampling = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = self.engine.generate([Request(p, adapter=a, sampling=sampling) for p, a in zip(prompts, adapters)])
        seconds = time.perf_counter() - start
        errors = [o.error for o in outs if o.error]
        if errors:
            raise RuntimeError(errors[0])
        return seconds, [list(o.token_ids) for o in outs]


def summarise(measured: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Medians over repeats, and the medians of each repeat's ratios to vLLM's bare and LoRA runs."""
    summary: dict[str, dict[str, float]] = {}
    for name, entries in measured.items():
        summary[name] = {key: statistics.median(e[key] for e in entries) for key in entries[0]}
        for key in ("end_to_end_tok_s", "decode_tok_s"):
            for peer, label in (("vllm:bare", "vllm_bare"), ("vllm:lora", "vllm_lora")):
                summary[name][f"{key}_vs_{label}"] = statistics.median(
                    e[key] / v[key] for e, v in zip(entries, measured[peer])
                )
    return summary


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over prompts of the fraction of positions before the first disagreement (greedy streams diverge
    for good after one different token, so this is the share of each stream the two engines share)."""
    shares = []
    for x, y in zip(a, b):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        shares.append(same / max(1, len(x)))
    return statistics.mean(shares)


def benchmark(args: Any, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pedro-peer-") as work:  # the saved backbone: hundreds of MB
        return _benchmark(args, log, Path(work))


def _benchmark(args: Any, log: Callable[[str], None], work: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    model, tokenizer = pedro.load_backbone(args.backbone, dtype=dtype, quiet=True)
    model_dir = work / "model"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    paths, params = make_adapters(model, work / "adapters", args.batch)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    low = min(100, vocab // 2)  # past the special tokens on a real vocabulary
    prompts = [[rng.randrange(low, vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    max_len = args.prompt_len + args.new_tokens + 8
    engines: dict[str, Engine] = {}
    for kind, method in (("bare", None), ("lora", "lora_r8_qv"), ("pedro", "pedro")):
        engine = Engine(
            model,
            tokenizer,
            max_batch=args.batch,
            max_seq_len=max_len,
            adapter_capacity=args.batch,
            exact_gemms=not args.fast_gemms,
        )
        for i, path in enumerate(paths[method] if method else ()):
            engine.add_adapter(f"{kind}-{i}", path)
        engines[kind] = engine
    adapters: dict[str, list[str | None]] = {
        "pedro:bare": [None] * args.batch,
        "vllm:bare": [None] * args.batch,
        "pedro:lora": [f"lora-{i}" for i in range(args.batch)],
        "vllm:lora": [str(p) for p in paths["lora_r8_qv"]],
        "pedro:pedro": [f"pedro-{i}" for i in range(args.batch)],
    }
    base_spec = {"model": str(model_dir), "dtype": dtype_name, "max_num_seqs": args.batch, "max_model_len": max_len}
    vllm_log = Path(args.out).with_suffix(".vllm.log")  # kept beside the report: the work folder is not
    vllm_log.parent.mkdir(parents=True, exist_ok=True)
    vllm_log.write_text("")
    log(f"starting vLLM (bare, and with LoRA slots on qkv_proj); its log: {vllm_log}")
    peers = {
        "vllm:bare": VllmPeer(args.vllm_python, dict(base_spec, lora=None), args.threads, vllm_log),
        "vllm:lora": VllmPeer(
            args.vllm_python,
            dict(base_spec, lora={"max_loras": args.batch, "max_lora_rank": 8, "target_modules": ["qkv_proj"]}),
            args.threads,
            vllm_log,
        ),
    }
    runners: dict[str, VllmPeer | PedroPeer] = {
        "pedro:bare": PedroPeer(engines["bare"]),
        "vllm:bare": peers["vllm:bare"],
        "pedro:lora": PedroPeer(engines["lora"]),
        "vllm:lora": peers["vllm:lora"],
        "pedro:pedro": PedroPeer(engines["pedro"]),
    }
    names = list(runners)
    for name in names:  # warm-up: compiled kernels, resident adapters, committed cache pages
        runners[name].generate(prompts, adapters[name], args.new_tokens)
        log(f"warmed up {name}")
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    tokens: dict[str, list] = {}
    started = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                full, tokens[name] = runners[name].generate(prompts, adapters[name], args.new_tokens)
                prefill, _ = runners[name].generate(prompts, adapters[name], 1)
                entry = {
                    "end_to_end_tok_s": args.batch * args.new_tokens / full,
                    "decode_tok_s": args.batch * (args.new_tokens - 1) / max(1e-9, full - prefill),
                    "prefill_s": prefill,
                    "total_s": full,
                }
                measured[name].append(entry)
                log(
                    f"[rep {rep}] {name:<14} end-to-end {entry['end_to_end_tok_s']:7.1f} tok/s  decode "
                    f"{entry['decode_tok_s']:7.1f} tok/s  prefill {prefill:5.2f} s  ({time.perf_counter() - started:.0f}s)"
                )
    finally:
        for peer in peers.values():
            peer.close()
    vllm_version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "setup": {
            "backbone": args.backbone,
            "dtype": dtype_name,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "pedro_gemms": "exact (F.linear)"
            if engines["bare"].exact_gemms
            else "fast (oneDNN fp32 where it checks out)",
            "lora": "PEFT r=8 on q_proj, v_proj, one per row (vLLM: max_loras=batch, target_modules=[qkv_proj])",
            "adapter_parameters": params,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "cpu_native_bf16": resolve_dtype("auto") == torch.bfloat16,
            "torch": torch.__version__,
            "vllm": vllm_version,
        },
        "bare_token_agreement": agreement(tokens["pedro:bare"], tokens["vllm:bare"]),
        "runs": measured,
        "summary": summarise(measured),
        "wall_s": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        "# pedro's engine and vLLM side by side",
        "",
        "Command: `pedro bench multitenant --peer vllm` (benchmarks/peer.py)",
        "",
        f"Machine: {result['machine']['cpu_count']} CPUs, "
        + ("native bf16 matmuls" if result["machine"]["cpu_native_bf16"] else "no native bf16 matmuls")
        + f", {result['machine']['platform']}, torch {result['machine']['torch']}.",
        "",
        f"{s['backbone']} in {s['dtype']}, pedro's GEMMs {s['pedro_gemms']}, batch {s['batch']}, prompts of {s['prompt_len']} token ids, {s['new_tokens']} new "
        f"tokens each (greedy, ignore_eos), {s['threads']} threads for each engine's model work, vLLM "
        f"{result['machine']['vllm']} (CPU build) in its own environment, its engine core in the driver's "
        f"process. LoRA: {s['lora']}. Greedy tokens of the two bare engines agree on "
        f"{100 * result['bare_token_agreement']:.1f} % of each stream (their arithmetic differs).",
    ]
    lines += [
        "",
        f"Each configuration in turn, the order rotated every repeat; medians of {s['repeats']} repeats (ratios "
        "taken within a repeat).",
        "",
        "| engine : adapters (one per row, all distinct) | end-to-end tok/s | decode tok/s | prefill s "
        f"| end-to-end vs vLLM bare | decode vs vLLM bare | end-to-end vs vLLM {s['batch']} LoRAs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["summary"].items():
        lines.append(
            f"| {name} | {r['end_to_end_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['prefill_s']:.2f} | "
            f"{r['end_to_end_tok_s_vs_vllm_bare']:.2f}x | {r['decode_tok_s_vs_vllm_bare']:.2f}x | "
            f"{r['end_to_end_tok_s_vs_vllm_lora']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(names, [summary[n]["end_to_end_tok_s"] for n in names], color="#4c72b0")
    ax.barh(names, [summary[n]["decode_tok_s"] for n in names], color="none", edgecolor="k", hatch="//")
    ax.set_xlabel("tokens/s (solid: end to end, hatched: decode)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_peer_options(parser: Any, required: bool = False) -> None:
    """The options only a run next to another engine has, on ``parser`` (or an argument group): multitenant.py
    lists them in its own help too, as the way in to this benchmark."""
    parser.add_argument(
        "--peer",
        choices=["vllm"],
        required=required,
        help="the engine to run pedro's next to (this run then takes benchmarks/peer.py's options)",
    )
    parser.add_argument(
        "--vllm-python",
        default=None,
        help=f"the python of a virtual environment with vLLM installed (default: ${VLLM_PYTHON_ENV}; "
        "`bash scripts/install_vllm_cpu.sh vllm-venv` makes one)",
    )
    parser.add_argument(
        "--fast-gemms",
        action="store_true",
        help="pedro's engine with exact_gemms=False: fp32 GEMMs through oneDNN (batch-invariant, within rounding; "
        "vLLM's arithmetic is not F.linear's either). bf16 is exact either way",
    )


def run(argv: list[str]) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_peer_options(parser, required=True)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for each engine's model work")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="both engines' dtype; auto: bfloat16 where the CPU has native bf16 matmuls, else float32",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out("multitenant_vllm"),
        help="path prefix for .json / .md / .png (default: results/multitenant_vllm in the current directory)",
    )
    args = parser.parse_args(argv)
    python = args.vllm_python = args.vllm_python or os.environ.get(VLLM_PYTHON_ENV)
    problem = None
    if not python:
        problem = f"no vLLM environment given (--vllm-python or ${VLLM_PYTHON_ENV})"
    elif subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode != 0:
        problem = f"{python} cannot import vllm"
    if problem:
        # asked for a comparison it cannot make: a failure, so that a script running it does not carry on without
        raise SystemExit(
            f"error: {problem}. Install vLLM's CPU build in its own environment with `bash "
            f"scripts/install_vllm_cpu.sh vllm-venv`, then pass --vllm-python vllm-venv/bin/python or set "
            f"${VLLM_PYTHON_ENV} (docs/engine.md, 'vLLM as a peer')."
        )
    result = benchmark(args, log=lambda s: print(s, flush=True))
    write_report(args.out, result, markdown(result), plot)
    return result
