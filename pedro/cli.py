"""The ``pedro`` command line."""

from __future__ import annotations

import os
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
    model_type = model.config.model_type
    table = Table(title=f"PEDRO sites in each adapted layer ({prefix}*), {model_type}")
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
    from pedro.io import local_adapter

    adapter_dir = local_adapter(adapter) if adapter is not None else None
    base, tokenizer = pedro.load_backbone(backbone)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, str(adapter_dir))
    from pedro.data import encode_prompt

    # the same prompt tokens training used (chat template, or the tokenizer's own BOS without one)
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, p) for p in prompt]}, return_tensors="pt")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]  # a transformers / PEFT model's generate
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
    max_prefill_tokens: Optional[int] = typer.Option(
        None,
        help="Prefill per engine step, in prompt tokens (default 32): a longer prompt is split over steps, "
        "so decoding requests keep streaming while it is admitted.",
    ),
    adapter_capacity: Optional[int] = typer.Option(None, help="Adapters resident in memory (LRU)."),
    dtype: Optional[str] = typer.Option(
        None, help="float32 (default, exact), bfloat16 (~2x faster decoding on CPUs with native bf16), auto."
    ),
    device: Optional[str] = typer.Option(
        None, help="Where the engine runs: cpu (default), cuda, cuda:N (Ray replicas then reserve a GPU each)."
    ),
    exact_gemms: Optional[bool] = typer.Option(
        None,
        "--exact-gemms/--fast-gemms",
        help="Every product bit for bit F.linear's (default), or fp32 GEMMs through oneDNN on a CPU: "
        "batch-invariant, within rounding, faster where MKL is slow (AMD CPUs).",
    ),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longer prompts get 400."),
    max_tokens: Optional[int] = typer.Option(None, help="Largest max_tokens a request may ask for."),
    max_queued: Optional[int] = typer.Option(None, help="Waiting requests beyond max_batch; more get 429."),
    max_upload_bytes: Optional[int] = typer.Option(None, help="Largest adapter upload (413 above)."),
    max_request_bytes: Optional[int] = typer.Option(
        None, help="Largest request body other than an upload (413 above)."
    ),
    max_requests_per_tenant: Optional[int] = typer.Option(
        None, help="Running + waiting requests per tenant (429 above)."
    ),
    ray: bool = typer.Option(False, "--ray", help="Scale out as a Ray Serve application (needs pedro-peft[ray])."),
    replicas: Optional[int] = typer.Option(None, help="Ray: engine replicas."),
    min_replicas: Optional[int] = typer.Option(None, help="Ray: autoscaling lower bound."),
    max_replicas: Optional[int] = typer.Option(None, help="Ray: autoscaling upper bound."),
    ray_address: Optional[str] = typer.Option(None, help="Ray: cluster address (default: start a local one)."),
) -> None:
    """Serve the backbone and registered adapters over an OpenAI-compatible HTTP API (docs/server.md)."""
    from pedro.server.config import ServerConfig

    settings = ServerConfig.load(
        config,
        backbone=backbone,
        model_name=model_name,
        adapters_dir=adapters_dir,
        keys_file=keys_file,
        host=host,
        port=port,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_prefill_tokens=max_prefill_tokens,
        adapter_capacity=adapter_capacity,
        dtype=dtype,
        device=device,
        exact_gemms=exact_gemms,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        max_queued=max_queued,
        max_upload_bytes=max_upload_bytes,
        max_request_bytes=max_request_bytes,
        max_requests_per_tenant=max_requests_per_tenant,
        ray_replicas=replicas,
        ray_min_replicas=min_replicas,
        ray_max_replicas=max_replicas,
        ray_address=ray_address,
    )
    if ray:
        from pedro.server.ray_app import serve_on_ray

        serve_on_ray(settings)
    else:
        from pedro.server import serve as serve_locally

        serve_locally(settings)


@app.command()
def train(
    data: str = typer.Option(..., help="JSONL (prompt/response or messages), a datasets folder, or a task name."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the adapter and summary are written."),
    backbone: str = typer.Option("smollm2-135m", help=BACKBONE_HELP),
    method: str = typer.Option("pedro", help="pedro | lora | ia3"),
    match_params: Optional[str] = typer.Option(None, help="'pedro' or a count: size this method to that budget."),
    r: int = typer.Option(8, help="PEDRO generator bottleneck."),
    pooler: str = typer.Option("last", help="PEDRO pooler: last | mean | max | attention"),
    activation: str = typer.Option("gelu", help="PEDRO activation: relu | gelu | silu | rational"),
    targets: str = typer.Option("q,v,up", help="PEDRO: projections to scale."),
    pool_source: str = typer.Option("normed", help="PEDRO: pool the layer's normed input or the raw residual."),
    share_generator: bool = typer.Option(False, help="PEDRO: one generator for all layers."),
    normalize_pooled: bool = typer.Option(False, help="PEDRO: the pooled vector divided by its RMS before Down."),
    scale_bound: Optional[float] = typer.Option(None, help="PEDRO: c > 0 keeps every scale within c of 1."),
    rational_lr: Optional[float] = typer.Option(None, help="Own learning rate for rational coefficients."),
    bias_lr: Optional[float] = typer.Option(None, help="PEDRO: own learning rate for the generators' Up bias."),
    bilevel: bool = typer.Option(
        False, "--bilevel", help="PEDRO, rational activation: train its coefficients on dev batches, alternating."
    ),
    lora_r: int = typer.Option(8),
    lora_targets: str = typer.Option("q,v", help="LoRA: projections (q,k,v,o,gate,up,down)."),
    ia3_targets: str = typer.Option("k,v,down", help="(IA)3: projections (down scales its input)."),
    objective: str = typer.Option(
        "lm",
        help="lm: the response's tokens | choice: choice data with one-token options, cross-entropy over the options.",
    ),
    max_length: int = typer.Option(512, help="Longest prompt+response in tokens."),
    overflow: str = typer.Option("truncate", help="Longer records: truncate (the response) | drop | error"),
    epochs: Optional[float] = typer.Option(
        None, help="Passes over the data (default: enough for ~300 steps, 1 to 10, by the data's size)."
    ),
    max_steps: int = typer.Option(-1, help="Stop after this many steps (overrides epochs)."),
    batch_size: int = typer.Option(8),
    grad_accum: int = typer.Option(1),
    lr: Optional[float] = typer.Option(
        None, help="Learning rate (default per method: pedro 1e-3, lora 1e-3, ia3 1e-2)."
    ),
    scheduler: str = typer.Option("cosine", help="cosine | linear | constant_with_warmup ..."),
    warmup: float = typer.Option(0.06, help="Warm-up: a ratio of the steps (<1) or a step count."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 on a CPU with native bf16 or a bf16 GPU, else fp32) | fp32 | bf16 | fp16"
    ),
    group_by_length: bool = typer.Option(True, help="Batch rows of similar length (little padding)."),
    response_logits_only: bool = typer.Option(True, help="Run the LM head only where the loss reads it."),
    attention: str = typer.Option("auto", help="auto (eager under bf16 when it fits) | eager | sdpa"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's; 1 on a busy machine)."),
    seed: int = typer.Option(0),
    limit: Optional[int] = typer.Option(None, help="Train on N records (after a seeded shuffle)."),
    eval_data: Optional[str] = typer.Option(
        None,
        help="Held-out records for periodic eval loss (and accuracy when they are choice examples: "
        "jsonl:DIR with options, or a task name, whose test split is then used).",
    ),
    dev_split: Optional[float] = typer.Option(
        None,
        help="Training records held out to pick the best epoch: a fraction, a count, or 0 for none "
        "(default: 10%, 32 to 500, when there are 200+ records and no --eval-data).",
    ),
    eval_steps: int = typer.Option(
        0, help="Evaluate every N steps (default: every epoch, when there is held-out data)."
    ),
    early_stopping: int = typer.Option(0, help="Patience in evaluations (0 = off)."),
    save_steps: int = typer.Option(0, help="Checkpoint every N steps (0 = none)."),
    save_total_limit: int = typer.Option(2, help="Checkpoints kept (oldest deleted)."),
    logging_steps: int = typer.Option(10, help="Log loss and tokens/s every N steps."),
    padding_side: str = typer.Option("right", help="Batch padding side: right | left."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUTPUT_DIR."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with task data (default ../shared/data)."),
    report_to: str = typer.Option("", help="tensorboard,wandb when installed."),
) -> None:
    """Fine-tune an adapter; writes a PEFT adapter folder, training_summary.json and train_log.jsonl."""
    from pedro.train import train as run_training

    try:
        run_training(
            data=data,
            output_dir=str(output_dir),
            backbone=backbone,
            method=method,
            match_params=match_params,
            r=r,
            pooler=pooler,
            activation=activation,
            targets=targets,
            pool_source=pool_source,
            share_generator=share_generator,
            normalize_pooled=normalize_pooled,
            scale_bound=scale_bound,
            rational_lr=rational_lr,
            bias_lr=bias_lr,
            bilevel=bilevel,
            lora_r=lora_r,
            lora_targets=lora_targets,
            ia3_targets=ia3_targets,
            objective=objective,
            max_length=max_length,
            overflow=overflow,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            scheduler=scheduler,
            warmup=warmup,
            precision=precision,
            group_by_length=group_by_length,
            response_logits_only=response_logits_only,
            attention=attention,
            threads=threads,
            seed=seed,
            limit=limit,
            eval_data=eval_data,
            dev_split=dev_split,
            eval_steps=eval_steps,
            early_stopping=early_stopping,
            save_steps=save_steps,
            resume=resume,
            save_total_limit=save_total_limit,
            logging_steps=logging_steps,
            padding_side=padding_side,
            data_dir=data_dir,
            report_to=[x for x in report_to.split(",") if x],
        )
    except KeyboardInterrupt:  # Trainer's checkpoints are complete or ignored on resume (trainer.py)
        console.print(
            f"\ninterrupted: checkpoints written so far are in {output_dir / 'checkpoints'}; the same command with "
            "--resume continues from the last complete one (with none there, it starts over)"
        )
        raise typer.Exit(130) from None


@app.command(name="eval")
def evaluate_command(
    task: str = typer.Option(..., help="sst2 | rte | gsm8k | e2e | trec | conala | jsonl:DIR"),
    adapter: Optional[str] = typer.Option(None, help="An adapter folder (its backbone is the default --backbone)."),
    base: bool = typer.Option(False, "--base", help="Score the bare backbone."),
    backbone: Optional[str] = typer.Option(None, help=BACKBONE_HELP + " (default: the adapter's, else smollm2-135m)"),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, min=1, help="Score the first N examples."),
    batch_size: int = typer.Option(16, min=1),
    data_dir: Optional[str] = typer.Option(None, help="Folder with task data (default ../shared/data)."),
    output: Optional[str] = typer.Option(
        None,
        help="JSON result file (predictions go next to it), or a folder (one that exists, or a path ending in /) to "
        "write eval_TASK_SPLIT.json in; default ADAPTER/ or outputs/eval/BACKBONE-base/.",
    ),
) -> None:
    """Score a backbone or an adapter on a task; prints and writes the metrics JSON and per-example predictions."""
    import json

    from pedro.data import write_json_atomic
    from pedro.evaluate import evaluate as run_eval
    from pedro.evaluate import load_for_eval
    from pedro.tasks import get_task

    if base == (adapter is not None):
        raise typer.BadParameter("give exactly one of --adapter DIR or --base")
    task_obj = get_task(task, data_dir)
    task_obj.path(split)  # missing data fails here, with where it was looked for, before loading a model
    default = default_eval_output(task, split, adapter, backbone)
    if output is None:
        target = default
    elif output.endswith(("/", os.sep)) or Path(output).is_dir():
        target = Path(output) / default.name
    else:
        target = Path(output)
    model, tokenizer = load_for_eval(backbone, adapter)
    predictions = target.with_name(target.stem + "_predictions.jsonl")
    result = run_eval(model, tokenizer, task_obj, split, limit, batch_size, predictions_path=predictions)
    result["adapter"] = adapter
    result["predictions"] = str(predictions)
    write_json_atomic(target, result)
    console.print_json(json.dumps(result))
    console.print(f"wrote {target} and {predictions}", soft_wrap=True)


def default_eval_output(task: str, split: str, adapter: str | None, backbone: str | None) -> Path:
    """Where ``pedro eval`` writes without ``--output``: next to the adapter, or for ``--base`` in
    ``outputs/eval/<backbone>-base/`` (under the working directory); the file is ``eval_<task>_<split>.json``."""
    import re

    from pedro.backbones import DEFAULT_BACKBONE

    name = f"eval_{task.replace(':', '_').replace('/', '_')}_{split}.json"
    if adapter is not None:
        return Path(adapter) / name
    model = Path(backbone).name.removesuffix(".gguf") if backbone is not None else DEFAULT_BACKBONE
    return Path("outputs") / "eval" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}-base" / name


bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks (write results/<name>.json, .md, .png in the current directory)."
)
app.add_typer(bench_app, name="bench")
# --help too goes to the script, whose own help lists its options (the command's docstring shows in `pedro bench --help`)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _run_benchmark(name: str, args: list[str]) -> None:
    """Run benchmarks/<name>.py with ``args``: the scripts are the single source of each benchmark."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the benchmarks ship with the source checkout, not the wheel")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


@bench_app.command("multitenant", context_settings=PASS_THROUGH)
def bench_multitenant(ctx: typer.Context) -> None:
    """Engine throughput vs distinct adapters per batch: bare / PEDRO / LoRA / (IA)3 / HF PEFT -> results/multitenant[-PRESET].*
    (options pass through to benchmarks/multitenant.py, e.g. --preset full; pedro bench NAME --help shows them)."""
    _run_benchmark("multitenant", ctx.args)


@bench_app.command("serve", context_settings=PASS_THROUGH)
def bench_serve(ctx: typer.Context) -> None:
    """Load benchmark of pedro serve: PEDRO vs LoRA vs base under concurrent clients -> results/serve.*
    (options pass through to benchmarks/serve.py; pedro bench NAME --help shows them)."""
    _run_benchmark("serve", ctx.args)


@bench_app.command("train", context_settings=PASS_THROUGH)
def bench_train(ctx: typer.Context) -> None:
    """Training tokens/s: PEDRO vs parameter-matched LoRA, fp32 vs bf16, interleaved -> results/train_speed.*
    (options pass through to benchmarks/train_speed.py; pedro bench NAME --help shows them)."""
    _run_benchmark("train_speed", ctx.args)


@bench_app.command("quality", context_settings=PASS_THROUGH)
def bench_quality(ctx: typer.Context) -> None:
    """PEDRO vs parameter-matched LoRA and (IA)3: --phase dev (the defaults' choices) or the study on five tasks
    -> results/quality*.{json,md} (options pass through to benchmarks/quality.py, e.g. --quick; pedro bench NAME --help shows them)."""
    _run_benchmark("quality", ctx.args)


def main() -> None:
    """Entry point: a bad input ends with its message, not a traceback."""
    try:
        app()
    except USER_ERRORS as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
