"""The README's main job, ``pedro demo``: fine-tune two tenants' PEDRO adapters on generated data, then serve both
in one mixed batch through the multi-tenant engine and measure what the adapters cost.

``tenant_datasets`` makes the tenants' data, ``demo_tenants`` trains and scores their adapters, ``serve_mixed``
serves prompts over any adapters in one batch and measures its decode throughput against the bare backbone
(both in the same process, interleaved, median of ``repeats``); ``run`` is the whole job.
"""

from __future__ import annotations

import itertools
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from rich.console import Console

from pedro.backbones import DEFAULT_BACKBONE, load_backbone
from pedro.engine import Engine, Request, SamplingParams

_TEAMS = {
    "billing": [
        "I was charged twice for my subscription",
        "my invoice shows the wrong amount",
        "please refund the extra fee on my card",
        "why did my monthly price go up",
        "the payment failed but money left my account",
        "I need a copy of last month's receipt",
    ],
    "shipping": [
        "my parcel has not arrived after two weeks",
        "the tracking number does not work",
        "the box came damaged and wet",
        "can you deliver to my office instead",
        "the courier left my package at the wrong house",
        "how long does delivery to Spain take",
    ],
    "account": [
        "I cannot log in after changing my password",
        "please delete my account and data",
        "how do I change the email on my profile",
        "my account was locked after three attempts",
        "I want to add a second user to my plan",
        "the verification code never reaches my phone",
    ],
    "technical": [
        "the app crashes when I open settings",
        "the website shows an error 500",
        "the sync between my laptop and phone stopped",
        "the export to PDF produces empty pages",
        "notifications stopped working after the update",
        "the search returns nothing for any query",
    ],
}
_OPENERS = ["Hello,", "Hi team,", "Urgent:", "Good morning.", "Dear support,", "Hey,"]
_CLOSERS = ["Thanks.", "Please help.", "Regards, Sam", "This is the second time I write.", "", "Cheers"]
_CITIES = [
    "Lyon",
    "Porto",
    "Munich",
    "Denver",
    "Osaka",
    "Dublin",
    "Krakow",
    "Seville",
    "Bergen",
    "Austin",
    "Leeds",
    "Turin",
]
_ITEMS = [
    "3 boxes of printer paper",
    "a standing desk",
    "12 coffee mugs",
    "two office chairs",
    "a laptop stand",
    "500 envelopes",
    "a whiteboard",
    "6 monitor cables",
]
_ORDER_TEMPLATES = [
    "Order #{n}: {item}, ship to {city} before Friday.",
    "Please send {item} to our {city} branch (ref {n}).",
    "Customer {n} in {city} ordered {item}; express delivery.",
    "Deliver {item} to the warehouse in {city}. PO {n}.",
]


def tenant_datasets(seed: int = 0, n_train: int = 48, n_test: int = 24) -> dict[str, dict[str, list[dict]]]:
    """Two tenants' small data sets, generated (no download, no ../shared): ``acme`` routes support tickets
    to a team (a choice task), ``globex`` extracts an order's destination city in capital letters (exact
    match). Test records are other combinations (of opener, ticket and closer; of template, city and item)
    than the training records."""
    rng = random.Random(seed)
    tickets = [
        (team, f"{o} {text}. {c}".strip())
        for team, texts in _TEAMS.items()
        for text in texts
        for o, c in zip(_OPENERS, _CLOSERS)
    ]
    rng.shuffle(tickets)
    route = "Route this support ticket to one team: billing, shipping, account or technical.\nTicket: {}"
    acme = [{"prompt": route.format(text), "response": team, "options": list(_TEAMS)} for team, text in tickets]
    orders = []
    for template, city, _ in itertools.product(_ORDER_TEMPLATES, _CITIES, range(2)):
        text = template.format(n=rng.randint(1000, 9999), item=rng.choice(_ITEMS), city=city)
        orders.append(
            {
                "prompt": f"Extract the destination city of this order, in capital letters.\nOrder: {text}",
                "response": city.upper(),
            }
        )
    rng.shuffle(orders)
    return {
        "acme": {"train": acme[:n_train], "test": acme[n_train : n_train + n_test]},
        "globex": {
            "train": [{k: r[k] for k in ("prompt", "response")} for r in orders[:n_train]],
            "test": orders[n_train : n_train + n_test],
        },
    }


def demo_tenants(
    output_dir: str | Path, backbone: str = DEFAULT_BACKBONE, epochs: float = 2.0, console: Any = None
) -> list[Path]:
    """Train one small PEDRO adapter per tenant on generated data, print each tenant's test metric before
    (bare backbone) and after (its adapter), generate with each, and return the adapter folders.

    The main job's multi-tenant part: the adapters it writes are what the engine then serves side by side.
    """
    import copy

    from rich.console import Console

    from pedro.data import write_jsonl_atomic
    from pedro.evaluate import evaluate, generate_texts
    from pedro.tasks import get_task
    from pedro.train import train

    console = console or Console()
    root = Path(output_dir)
    base, tokenizer = load_backbone(backbone)
    adapters = []
    for tenant, splits in tenant_datasets().items():
        data_dir = root / tenant / "data"
        for split, rows in splits.items():
            write_jsonl_atomic(data_dir / f"{split}.jsonl", rows)
        task = get_task(f"jsonl:{data_dir}")
        task.max_new_tokens = 8
        before = evaluate(base, tokenizer, task, "test", progress=False)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = train(
            model=model,
            tokenizer=tokenizer,
            data=str(data_dir / "train.jsonl"),
            backbone=backbone,
            output_dir=str(root / tenant / "adapter"),
            method="pedro",
            epochs=epochs,
            batch_size=4,
            lr=2e-3,
            max_length=128,
            logging_steps=4,
            progress=False,
            # the settings the README's recorded demo output was produced with
            precision="fp32",
            group_by_length=False,
        )
        after = evaluate(result.model, tokenizer, task, "test", progress=False)
        prompt = splits["test"][0]["prompt"]
        text = generate_texts(result.model, tokenizer, [prompt], max_new_tokens=8, progress=False)[0]
        console.print(
            f"[bold]{tenant}[/bold] ({task.kind}, {len(splits['train'])} train / {before['n']} test): "
            f"{task.metric} {before[task.metric]:.2f} before -> {after[task.metric]:.2f} after "
            f"({result.summary['steps']} steps, {time.perf_counter() - start:.0f}s)"
        )
        console.print(f"  > {prompt.splitlines()[-1]}\n  {text}")
        adapters.append(result.output_dir)
        del model, result
    return adapters


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
        [
            Request(p, adapter=t, sampling=SamplingParams(max_new_tokens=max_new_tokens))
            for p, t in zip(prompts, tenants)
        ]
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


REQUESTS_PER_TENANT = 4


def run(
    backbone: str = DEFAULT_BACKBONE, output_dir: str | Path = "outputs/demo", console: Console | None = None
) -> None:
    """Train (before/after metric and a generation per tenant), then serve the adapters side by side and
    report the measured PEDRO/bare decode-throughput ratio of that mixed batch."""
    console = console or Console()
    start = time.perf_counter()
    console.rule("1. fine-tune one PEDRO adapter per tenant")
    adapter_dirs = demo_tenants(output_dir, backbone=backbone, console=console)
    console.rule("2. serve both tenants in one mixed batch")
    tests = {tenant: splits["test"] for tenant, splits in tenant_datasets().items()}
    tenants = list(tests)
    prompts = [
        tests[tenants[i % len(tenants)]][i // len(tenants)]["prompt"] for i in range(REQUESTS_PER_TENANT * len(tenants))
    ]
    serve_mixed(dict(zip(tenants, adapter_dirs)), prompts, backbone=backbone, max_new_tokens=8)
    console.print(f"main job done in {time.perf_counter() - start:.0f}s; adapters in {Path(output_dir).resolve()}")
