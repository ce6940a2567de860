"""The README's main job: PEDRO on the default backbone, end to end."""

from __future__ import annotations

import time

import torch
from rich.console import Console

import pedro

PROMPTS = ["What is the capital of France?", "Give me one tip for staying focused."]


def run(backbone: str = pedro.DEFAULT_BACKBONE, max_new_tokens: int = 40, console: Console | None = None) -> None:
    """Load the backbone, attach a fresh PEDRO adapter, show its size, and generate for two prompts.

    A fresh adapter is the identity, so its answers must equal the bare backbone's: the demo checks that
    too, as a smoke test a user can run on any machine.
    """
    console = console or Console()
    model, tokenizer = pedro.load_backbone(backbone)
    config = pedro.PedroConfig()
    peft_model = pedro.get_pedro_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    console.print(
        f"PEDRO r={config.r}, targets={config.targets}, pooler={config.pooler}: "
        f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})"
    )
    texts = [pedro.format_prompt(tokenizer, p) for p in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        start = time.perf_counter()
        adapted = peft_model.generate(**batch, **settings)
        seconds = time.perf_counter() - start
        with peft_model.disable_adapter():
            bare = peft_model.generate(**batch, **settings)
    width = batch["input_ids"].shape[1]
    for prompt, row in zip(PROMPTS, adapted[:, width:]):
        console.print(f"[bold]> {prompt}[/bold]\n{tokenizer.decode(row, skip_special_tokens=True).strip()}")
    new_tokens = int((adapted[:, width:] != tokenizer.pad_token_id).sum())
    console.print(f"{new_tokens} tokens in {seconds:.1f}s; fresh adapter == bare backbone: {torch.equal(adapted, bare)}")
