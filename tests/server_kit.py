"""Shared pieces of the server tests: a tiny backbone with a chat template, tenants' adapters, keys, a config,
an uploader, and a snapshot of the adapters directory (to prove a refused request changed nothing on disk)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import peft
import torch
import yaml
from conftest import randomize, tiny_model, tiny_tokenizer

import pedro

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
TENANTS = {"alice": "sk-alice-000001", "bob": "sk-bob-0000001", "carol": "sk-carol-000001", "dave": "sk-dave-0000001"}
ADMIN_KEY = "sk-admin-000001"
PROMPTS = ["3 4 5 6", "10 11 12", "7 8 9 20 21 22 23", "40 41"]


def make_backbone(path: Path, endless: bool = False, **overrides: Any) -> Path:
    """A saved tiny LLaMA whose tokenizer has a chat template (so /v1/chat/completions works). ``endless``: no
    EOS token at all, so every request runs to max_tokens (the fault tests need long, predictable requests)."""
    model = tiny_model("llama", **overrides)
    tokenizer = tiny_tokenizer()
    if endless:
        model.config.eos_token_id = model.generation_config.eos_token_id = None
        tokenizer.eos_token = None
    model.save_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def make_adapter(path: Path, kind: str, seed: int, **model_overrides: Any) -> Path:
    """A non-identity PEDRO or LoRA adapter for the tiny LLaMA, distinct per seed; -> its directory."""
    base = tiny_model("llama", **model_overrides)
    torch.manual_seed(seed)
    if kind == "pedro":
        model = pedro.get_pedro_model(base, pedro.PedroConfig(r=4))
        randomize(model, seed=seed, scale=0.3)
    else:
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    model.save_pretrained(path)
    (path / "README.md").unlink(missing_ok=True)
    return path


def write_config(root: Path, backbone: Path, **overrides: Any) -> Path:
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {t: [k] for t, k in TENANTS.items()}, "admin": [ADMIN_KEY]}))
    config = {
        "backbone": str(backbone),
        "model_name": "tiny",
        "adapters_dir": str(root / "adapters"),
        "keys_file": str(keys),
        "max_batch": 16,
        "max_seq_len": 128,
        "max_prompt_tokens": 64,
        "max_tokens": 48,
        "default_max_tokens": 8,
        "max_queued": 64,
        "max_upload_bytes": 256 * 1024,
        **overrides,
    }
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> the SHA-256 of its content ('dir' for directories)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }
