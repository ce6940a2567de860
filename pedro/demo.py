"""The README's main job: fine-tune two tenants' PEDRO adapters on the default backbone, then serve both in
one mixed batch through the multi-tenant engine."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

import pedro
from pedro.engine.demo import serve_mixed
from pedro.train import demo_tenants, tenant_datasets

REQUESTS_PER_TENANT = 4


def run(backbone: str = pedro.DEFAULT_BACKBONE, output_dir: str | Path = "outputs/demo", console: Console | None = None) -> None:
    """Train (before/after metric and a generation per tenant), then serve the adapters side by side and
    report the measured PEDRO/bare decode-throughput ratio of that mixed batch."""
    console = console or Console()
    start = time.perf_counter()
    console.rule("1. fine-tune one PEDRO adapter per tenant")
    adapter_dirs = demo_tenants(output_dir, backbone=backbone, console=console)
    console.rule("2. serve both tenants in one mixed batch")
    tests = {tenant: splits["test"] for tenant, splits in tenant_datasets().items()}
    tenants = list(tests)
    prompts = [tests[tenants[i % len(tenants)]][i // len(tenants)]["prompt"] for i in range(REQUESTS_PER_TENANT * len(tenants))]
    serve_mixed(dict(zip(tenants, adapter_dirs)), prompts, backbone=backbone, max_new_tokens=8)
    console.print(f"main job done in {time.perf_counter() - start:.0f}s; adapters in {Path(output_dir).resolve()}")
