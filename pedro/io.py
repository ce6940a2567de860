"""Checks on adapter files before they are trusted."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter directory whose files are missing, corrupt, or in a format we refuse to load."""


def check_adapter_dir(path: str | Path) -> None:
    """Validate a local adapter directory's weights file, when it has one (a config-only directory is fine).

    Reading every tensor catches a truncated file here, with the file named, instead of deep in PEFT.
    Pickle checkpoints are refused: loading one can run arbitrary code.
    """
    directory = Path(path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickled:
            raise AdapterFileError(
                f"{directory} holds {pickled} but no {WEIGHTS_NAME}: pickle checkpoints are not loaded "
                "(they can run arbitrary code); convert them to safetensors"
            )
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights} is not a valid safetensors file (corrupt or truncated): {err}") from err
