"""The ``pedro`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="PEDRO: prompt-dependent PEFT adapters.",
)
console = Console()

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)

BACKBONE_HELP = "smollm2-135m, gemma3-270m, a local model directory, or a .gguf file"


@app.command()
def info(
    backbone: str = typer.Option("smollm2-135m", help=BACKBONE_HELP),
    r: int = typer.Option(8, help="Generator bottleneck width."),
    targets: str = typer.Option("q,v,up", help="Comma-separated projections to scale."),
    pooler: str = typer.Option("last", help="last | mean | max | attention"),
    activation: str = typer.Option("gelu", help="relu | gelu | silu | rational"),
    share_generator: bool = typer.Option(False, help="One generator for all layers."),
) -> None:
    """Show the backbone, where PEDRO attaches in each layer, and the trainable parameters of a config."""
    import pedro
    from pedro.backbones import layer_map
    from pedro.model import plan_sites

    config = pedro.PedroConfig(
        r=r, targets=targets.split(","), pooler=pooler, activation=activation, share_generator=share_generator
    )
    model, _ = pedro.load_backbone(backbone)
    sites = plan_sites(config, model)
    first = min(site.layer for site in sites.values())
    prefix = f"{layer_map(model).layers}.{first}."
    table = Table(title=f"PEDRO sites in each adapted layer ({prefix}*), {model.config.model_type}")
    for column in ("module", "role", "slice of z"):
        table.add_column(column)
    for name, site in sorted(sites.items(), key=lambda item: (item[1].layer, item[1].kind != "tap", item[1].start)):
        if site.layer != first:
            continue  # every adapted layer has the same sites; the first one stands for all
        role = "vector generator input" if site.kind == "tap" else "scaled by 1 + z"
        span = f"width {site.end}" if site.kind == "tap" else f"[{site.start}:{site.end})"
        table.add_row(name.removeprefix(prefix), role, span)
    console.print(table)
    layers = sorted({s.layer for s in sites.values()})
    n_base = sum(p.numel() for p in model.parameters())
    n_pedro = pedro.count_trainable_parameters(config, model)
    console.print(f"adapted layers: {len(layers)} ({layers[0]}..{layers[-1]})")
    console.print(
        f"trainable parameters: {n_pedro:,} ({100 * n_pedro / n_base:.3f}% of {n_base:,} backbone parameters)"
    )


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A prompt; repeat for a batch."),
    backbone: str = typer.Option("smollm2-135m", help=BACKBONE_HELP),
    adapter: Optional[str] = typer.Option(None, help="A saved PEDRO adapter directory."),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0),
) -> None:
    """Generate with the backbone, or with an adapter on it (chat template applied when the backbone has one)."""
    import torch
    from peft import PeftModel

    import pedro

    model, tokenizer = pedro.load_backbone(backbone)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    texts = [pedro.format_prompt(tokenizer, p) for p in prompt]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    for text, row in zip(prompt, out[:, batch["input_ids"].shape[1] :]):
        console.print(f"[bold]> {text}[/bold]")
        console.print(tokenizer.decode(row, skip_special_tokens=True).strip())


@app.command()
def demo(backbone: str = typer.Option("smollm2-135m", help=BACKBONE_HELP)) -> None:
    """The main job: PEDRO on the default backbone, end to end (see the README)."""
    from pedro.demo import run

    run(backbone, console=console)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML server config; flags override it."),
    backbone: Optional[str] = typer.Option(None, help=BACKBONE_HELP),
    model_name: Optional[str] = typer.Option(None, help="The base model's id in the API (default: the backbone)."),
    adapters_dir: Optional[Path] = typer.Option(None, help="Where registered adapters and the registry live."),
    keys_file: Optional[Path] = typer.Option(None, help="YAML file mapping tenants to API keys."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    max_batch: Optional[int] = typer.Option(None, help="Running requests at once."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache tokens per request."),
    adapter_capacity: Optional[int] = typer.Option(None, help="Adapters resident in memory (LRU)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longer prompts get 400."),
    max_tokens: Optional[int] = typer.Option(None, help="Largest max_tokens a request may ask for."),
    max_queued: Optional[int] = typer.Option(None, help="Waiting requests beyond max_batch; more get 429."),
    max_upload_bytes: Optional[int] = typer.Option(None, help="Largest adapter upload (413 above)."),
    ray: bool = typer.Option(False, "--ray", help="Scale out as a Ray Serve application (needs pedro-peft[ray])."),
    replicas: Optional[int] = typer.Option(None, help="Ray: engine replicas."),
    min_replicas: Optional[int] = typer.Option(None, help="Ray: autoscaling lower bound."),
    max_replicas: Optional[int] = typer.Option(None, help="Ray: autoscaling upper bound."),
    ray_address: Optional[str] = typer.Option(None, help="Ray: cluster address (default: start a local one)."),
) -> None:
    """Serve the backbone and registered adapters over an OpenAI-compatible HTTP API (docs/server.md)."""
    from pedro.server.config import ServerConfig

    settings = ServerConfig.load(
        config, backbone=backbone, model_name=model_name, adapters_dir=adapters_dir, keys_file=keys_file,
        host=host, port=port, max_batch=max_batch, max_seq_len=max_seq_len, adapter_capacity=adapter_capacity,
        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_queued=max_queued,
        max_upload_bytes=max_upload_bytes, ray_replicas=replicas, ray_min_replicas=min_replicas,
        ray_max_replicas=max_replicas, ray_address=ray_address,
    )
    if ray:
        from pedro.server.ray_app import serve_on_ray

        serve_on_ray(settings)
    else:
        from pedro.server import serve as serve_locally

        serve_locally(settings)


def main() -> None:
    """Entry point: a bad input ends with its message, not a traceback."""
    try:
        app()
    except USER_ERRORS as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
