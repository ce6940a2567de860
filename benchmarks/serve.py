"""Load benchmark of ``pedro serve``: concurrent streaming clients on loopback, PEDRO vs LoRA adapters vs base.

One server process (the real ``pedro serve``, SmolLM2-135M by default) holds N PEDRO and N LoRA adapters of four
tenants. Closed-loop clients (each sends its next request when the previous one ends; their starts are staggered so
they do not move in lock-step waves) stream chat completions
of exactly ``max_tokens`` tokens (``ignore_eos``) for a fixed time per phase; phases rotate base -> PEDRO -> LoRA
for several rounds, so drift on a shared machine hits all three alike. Each PEDRO / LoRA request picks one of
that kind's adapters at random, so every batch mixes tenants. Reported per method: requests/s, output tokens/s,
time to first token p50/p99, time per output token p50/p99, and errors (which must be 0).

    python benchmarks/serve.py                 # or: pedro bench serve   -> results/serve.{json,md,png}
    python benchmarks/serve.py --preset smoke  # a few seconds, tiny random model: checks the script itself
                                               #   -> results/serve-smoke.{json,md,png}

All traffic goes to 127.0.0.1; the number of clients and the duration are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import peft
import torch
import yaml

import pedro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, percentile, use_server_process  # noqa: E402

use_server_process()
from server_process import ServerProcess, upload  # noqa: E402

METHODS = ("base", "pedro", "lora")
TENANTS = {f"tenant{i}": f"sk-bench-tenant-{i}" for i in range(4)}
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        backbone="smollm2-135m", adapters=8, clients=8, seconds=20.0, rounds=2, max_tokens=32, max_batch=16
    ),
    "smoke": dict(backbone="tiny", adapters=2, clients=2, seconds=2.0, rounds=1, max_tokens=8, max_batch=4),
}
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence what a compiler does.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Suggest a name for a black cat.",
]


# ------------------------------------------------------------------------------------------------ setup


def tiny_backbone(path: Path) -> str:
    """A random 2-layer LLaMA with a word-level tokenizer and a chat template (the smoke preset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(
            ["<pad>", "<eos>", "<unk>", *sorted({w for q in QUESTIONS for w in q.split()}), "user", "assistant"]
        )
    }
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant "
    tokenizer.save_pretrained(path)
    return str(path)


def make_adapters(backbone: str, directory: Path, n: int) -> dict[str, list[Path]]:
    """n PEDRO (r=8, q/v/up, small random generator weights) and n LoRA (r=8 on q,v, PEFT's random A and
    zero-init B replaced by small random values) adapters: non-identity, so every row does real work."""
    made: dict[str, list[Path]] = {"pedro": [], "lora": []}
    model, _ = pedro.load_backbone(backbone, quiet=True)
    for kind in ("pedro", "lora"):
        for i in range(n):
            torch.manual_seed(1000 * (kind == "lora") + i)
            config = (
                pedro.PedroConfig(r=8) if kind == "pedro" else peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
            )
            adapter = peft.get_peft_model(copy.deepcopy(model), config)
            with torch.no_grad():
                for param in adapter.parameters():
                    if param.requires_grad:
                        param.copy_(torch.randn_like(param) * 0.01)
            path = directory / f"{kind}{i}"
            adapter.save_pretrained(path)
            (path / "README.md").unlink(missing_ok=True)
            made[kind].append(path)
    return made


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Sample:
    ok: bool
    ttft: float = float("nan")
    tpot: float = float("nan")
    tokens: int = 0
    error: str = ""


@dataclass
class Phase:
    method: str
    seconds: float
    samples: list[Sample] = field(default_factory=list)


async def one_request(
    client: httpx.AsyncClient, url: str, key: str, model: str, question: str, max_tokens: int
) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            if response.status_code != 200:
                return Sample(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    last = time.perf_counter()
    except httpx.HTTPError as err:
        return Sample(False, error=f"{type(err).__name__}: {err}")
    if first is None or tokens != max_tokens:
        return Sample(False, error=f"got {tokens} tokens, asked for {max_tokens}")
    return Sample(True, first - start, (last - first) / max(1, tokens - 1), tokens)


async def run_phase(
    url: str,
    method: str,
    models: dict[str, list[tuple[str, str]]],
    clients: int,
    seconds: float,
    max_tokens: int,
    seed: int,
) -> Phase:
    """``clients`` closed-loop clients for ``seconds``; -> every finished request's sample."""
    phase = Phase(method, seconds)
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * min(0.5, seconds / (2 * clients)))  # staggered: no lock-step waves of requests
        while time.perf_counter() < deadline:
            key, model = rng.choice(models[method])
            phase.samples.append(await one_request(client, url, key, model, rng.choice(QUESTIONS), max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        phase.seconds = time.perf_counter() - start
    return phase


# ------------------------------------------------------------------------------------------------ report


def summarise(phases: list[Phase]) -> dict[str, dict[str, float]]:
    summary = {}
    for method in METHODS:
        mine = [p for p in phases if p.method == method]
        samples = [s for p in mine for s in p.samples]
        good = [s for s in samples if s.ok]
        seconds = sum(p.seconds for p in mine)
        summary[method] = {
            "requests": len(samples),
            "errors": len(samples) - len(good),
            "requests_per_s": len(good) / seconds,
            "output_tokens_per_s": sum(s.tokens for s in good) / seconds,
            "ttft_p50_ms": 1000 * percentile([s.ttft for s in good], 50),
            "ttft_p99_ms": 1000 * percentile([s.ttft for s in good], 99),
            "tpot_p50_ms": 1000 * percentile([s.tpot for s in good], 50),
            "tpot_p99_ms": 1000 * percentile([s.tpot for s in good], 99),
        }
    for method in METHODS:
        summary[method]["requests_per_s_vs_base"] = (
            summary[method]["requests_per_s"] / summary["base"]["requests_per_s"]
        )
    return summary


def markdown(summary: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    head = (
        "| method | requests | errors | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | req/s vs base |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = "".join(
        f"| {m} | {s['requests']} | {s['errors']} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} | "
        f"{s['ttft_p99_ms']:.0f} | {s['tpot_p50_ms']:.1f} | {s['tpot_p99_ms']:.1f} | {s['requests_per_s_vs_base']:.2f}x |\n"
        for m, s in summary.items()
    )
    return (
        f"# pedro serve load benchmark\n\n`{meta['command']}`\n\n"
        f"{meta['backbone']}, {meta['clients']} closed-loop streaming clients on 127.0.0.1, {meta['max_tokens']} output tokens per "
        f"request (ignore_eos), {meta['adapters']} PEDRO and {meta['adapters']} LoRA adapters over 4 tenants (each request a random "
        f"adapter of its kind), server max_batch {meta['max_batch']}, {meta['rounds']} rounds x {meta['seconds']:.0f} s per method, "
        f"{meta['machine']}; 1-minute load average {meta['load_average_1min'][0]} at the start, {meta['load_average_1min'][1]} "
        f"at the end (other jobs share this machine: compare methods within the table, not across runs).\n\n{head}{rows}"
    )


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    colours = ["#888888", "#d62728", "#1f77b4"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(methods, [summary[m]["requests_per_s"] for m in methods], color=colours)
    axes[0].set_title("requests / s")
    for ax, metric, title in (
        (axes[1], "ttft", "time to first token (ms)"),
        (axes[2], "tpot", "time per output token (ms)"),
    ):
        x = range(len(methods))
        ax.bar([i - 0.2 for i in x], [summary[m][f"{metric}_p50_ms"] for m in methods], 0.4, label="p50", color=colours)
        ax.bar(
            [i + 0.2 for i in x],
            [summary[m][f"{metric}_p99_ms"] for m in methods],
            0.4,
            label="p99",
            color=colours,
            alpha=0.45,
        )
        ax.set_xticks(list(x), methods)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("pedro serve: PEDRO vs LoRA adapters vs base, concurrent streaming clients")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--backbone", help="Override the preset's backbone (a name or directory).")
    parser.add_argument("--clients", type=int, help="Concurrent clients (at most 32).")
    parser.add_argument("--seconds", type=float, help="Seconds per method per round (at most 120).")
    parser.add_argument("--rounds", type=int, help="Rounds of base -> PEDRO -> LoRA.")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Path prefix for .json / .md / .png (default: results/serve in the current directory; "
        "results/serve-PRESET for a preset other than default).",
    )
    args = parser.parse_args(argv)
    cfg = {
        **PRESETS[args.preset],
        **{k: v for k, v in vars(args).items() if k in ("backbone", "clients", "seconds", "rounds") and v is not None},
    }
    if not 1 <= cfg["clients"] <= 32 or not 0 < cfg["seconds"] <= 120:
        parser.error("--clients must be in 1..32 and --seconds in (0, 120]: this benchmark stays bounded")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pedro-bench-serve-") as tmp:
        root = Path(tmp)
        backbone = tiny_backbone(root / "tiny") if cfg["backbone"] == "tiny" else cfg["backbone"]
        print(
            f"making {cfg['adapters']} PEDRO and {cfg['adapters']} LoRA adapters on {cfg['backbone']} ...", flush=True
        )
        adapters = make_adapters(backbone, root / "adapters-src", cfg["adapters"])
        (root / "keys.yaml").write_text(yaml.safe_dump({"tenants": {t: [k] for t, k in TENANTS.items()}}))
        server_config = {
            "backbone": backbone,
            "model_name": "base",
            "adapters_dir": str(root / "store"),
            "keys_file": str(root / "keys.yaml"),
            "max_batch": cfg["max_batch"],
            "max_seq_len": 512,
            "max_prompt_tokens": 256,
            "max_tokens": cfg["max_tokens"],
            "default_max_tokens": cfg["max_tokens"],
            "max_queued": 64,
            "adapter_capacity": 2 * cfg["adapters"],
            "max_upload_bytes": 2**26,
        }
        (root / "serve.yaml").write_text(yaml.safe_dump(server_config))
        with ServerProcess(root / "serve.yaml", root / "server.log") as server:
            keys = list(TENANTS.values())
            models: dict[str, list[tuple[str, str]]] = {"base": [(k, "base") for k in keys], "pedro": [], "lora": []}
            for kind, paths in adapters.items():
                for i, path in enumerate(paths):
                    key = keys[i % len(keys)]
                    upload(server.url, key, path.name, path, timeout=120).raise_for_status()
                    models[kind].append((key, path.name))
            asyncio.run(
                run_phase(server.url, "base", models, 2, min(3.0, cfg["seconds"]), cfg["max_tokens"], seed=-1)
            )  # warm-up
            phases = []
            for round_ in range(cfg["rounds"]):
                for method in METHODS:
                    phase = asyncio.run(
                        run_phase(
                            server.url, method, models, cfg["clients"], cfg["seconds"], cfg["max_tokens"], seed=round_
                        )
                    )
                    print(
                        f"round {round_ + 1}/{cfg['rounds']} {method}: {sum(s.ok for s in phase.samples)} ok, "
                        f"{sum(not s.ok for s in phase.samples)} errors in {phase.seconds:.1f} s",
                        flush=True,
                    )
                    phases.append(phase)

    summary = summarise(phases)
    errors = sorted({s.error for p in phases for s in p.samples if not s.ok})
    meta = {
        "command": "python benchmarks/serve.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        **cfg,
        "machine": f"{platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}",
        "errors": errors[:10],
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out = args.out or default_out("serve", args.preset, recorded="default")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    out.with_suffix(".md").write_text(markdown(summary, meta))
    plot(summary, out.with_suffix(".png"))
    print(markdown(summary, meta))
    if errors:
        print("errors:", *errors, sep="\n  ")
    return summary


if __name__ == "__main__":
    main()
