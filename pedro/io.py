"""Adapter files: checks before they are trusted, and the prompt format recorded with the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


# How training encoded prompts, kept in the weights file's safetensors metadata so that it travels with the two
# files PEFT saves (an upload, a copy) and serving can encode a prompt exactly as training did.
PROMPT_FORMAT_KEY = "pedro.prompt_format"
PROMPT_FORMATS = ("chat_template", "raw")


class AdapterFileError(ValueError):
    """An adapter directory whose files are missing, corrupt, or in a format we refuse to load."""


def check_adapter_dir(path: str | Path) -> None:
    """Validate a local adapter directory's weights file, when it has one (a config-only directory is fine).

    Reading every tensor catches a truncated file here, with the file named, instead of deep in PEFT.
    Pickle checkpoints are refused: loading one can run arbitrary code. The messages name the files, not
    ``path``: the caller adds it where it may be shown (a server's staging directory is not).
    """
    directory = Path(path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickled:
            raise AdapterFileError(
                f"the adapter holds {pickled} but no {WEIGHTS_NAME}: pickle checkpoints are not loaded "
                "(they can run arbitrary code); convert them to safetensors"
            )
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{WEIGHTS_NAME} is not a valid safetensors file (corrupt or truncated): {err}") from err


def record_prompt_format(directory: str | Path, prompt_format: str) -> None:
    """Write ``prompt_format`` (one of PROMPT_FORMATS) into the metadata of ``directory``'s weights file."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    weights = Path(directory) / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_file(load_file(str(weights)), str(weights), metadata={**metadata, PROMPT_FORMAT_KEY: prompt_format})


def read_prompt_format(directory: str | Path) -> Optional[str]:
    """The prompt format recorded with ``directory``'s weights, or None (an adapter not trained by pedro)."""
    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as handle:
        value = (handle.metadata() or {}).get(PROMPT_FORMAT_KEY)
    if value is not None and value not in PROMPT_FORMATS:
        raise AdapterFileError(f"{PROMPT_FORMAT_KEY} is {value!r}; expected one of {PROMPT_FORMATS}")
    return value
