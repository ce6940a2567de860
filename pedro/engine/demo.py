"""The main job's last act: several tenants' adapters served in one mixed batch, with the measured cost.

``serve_mixed(adapter_dirs, prompts)`` prints each tenant's answer and the decode throughput of that same
mixed batch relative to the bare backbone (both measured here, interleaved, median of ``repeats``).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from pedro.engine.engine import Engine
from pedro.engine.request import Request, SamplingParams


def _fresh_adapters(engine: Engine, n: int) -> dict[str, Path]:
    """n freshly initialised PEDRO adapters (the identity until trained), for when none were trained."""
    import pedro

    root = Path(tempfile.mkdtemp(prefix="pedro-fresh-"))
    dirs = {}
    for i in range(n):
        wrapped = pedro.get_pedro_model(engine.model, pedro.PedroConfig(r=8))
        wrapped.save_pretrained(str(root / f"fresh-{i}"))
        wrapped.unload()
        dirs[f"fresh-{i}"] = root / f"fresh-{i}"
    return dirs


def _decode_rate(engine: Engine, requests: list[Request]) -> float:
    engine.reset_stats()
    engine.generate(requests)
    return sum(n for n, _ in engine.stats["decode"]) / sum(s for _, s in engine.stats["decode"])


def serve_mixed(
    adapter_dirs: Optional[Union[Mapping[str, Union[str, Path]], Sequence[Union[str, Path]]]],
    prompts: Sequence[str],
    backbone: str = "smollm2-135m",
    max_new_tokens: int = 48,
    measure_tokens: int = 32,
    repeats: int = 3,
    engine: Optional[Engine] = None,
) -> dict[str, Any]:
    """Serve ``prompts`` in one batch, prompt i on adapter i mod n (PEDRO, LoRA or (IA)3 directories; a
    mapping gives the tenant names), print the answers, then measure decode tokens/s of that batch with its
    adapters against the same batch on the bare backbone. -> {"answers": [...], "ratio": float, ...}."""
    from rich.console import Console

    console = Console()
    engine = engine or Engine(backbone, max_batch=max(len(prompts), 1))
    if not adapter_dirs:
        adapter_dirs = _fresh_adapters(engine, 2)
        console.print("[yellow]no trained adapters given: serving two freshly initialised PEDRO adapters[/yellow]")
    named = dict(adapter_dirs) if isinstance(adapter_dirs, Mapping) else {Path(d).name: d for d in adapter_dirs}
    for name, directory in named.items():
        if name not in {a["name"] for a in engine.list_adapters()}:
            engine.add_adapter(name, directory)
    tenants = [list(named)[i % len(named)] for i in range(len(prompts))]
    outputs = engine.generate(
        [Request(p, adapter=t, sampling=SamplingParams(max_new_tokens=max_new_tokens)) for p, t in zip(prompts, tenants)]
    )
    answers = []
    for prompt, tenant, out in zip(prompts, tenants, outputs):
        console.print(f"[bold]{tenant}[/bold] > {prompt}")
        console.print(f"  {out.error or out.text.strip()}")
        answers.append({"tenant": tenant, "prompt": prompt, "answer": out.text, "error": out.error})
    fixed = SamplingParams(max_new_tokens=measure_tokens, ignore_eos=True)
    ratios = []
    for _ in range(repeats):
        mixed = _decode_rate(engine, [Request(p, adapter=t, sampling=fixed) for p, t in zip(prompts, tenants)])
        bare = _decode_rate(engine, [Request(p, sampling=fixed) for p in prompts])
        ratios.append(mixed / bare)
    ratio = statistics.median(ratios)
    kinds = sorted({a["kind"] for a in engine.list_adapters() if a["name"] in named})
    console.print(
        f"[bold]mixed batch of {len(prompts)} requests over {len(named)} adapters ({', '.join(kinds)}): "
        f"decode throughput {ratio:.3f}x the bare backbone[/bold] (median of {repeats}, same batch, same process)"
    )
    return {"answers": answers, "ratio": ratio, "ratios": ratios, "tenants": tenants}
